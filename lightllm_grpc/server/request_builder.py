"""Validates a GenerateRequest field by field and turns it into a scheduler Request."""

from __future__ import annotations

import dataclasses
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.scheduler.request import OutputOptions, Request, StopOptions
from lightllm_grpc.scheduler.sampling import SamplingOptions, resolve
from lightllm_grpc.server.constraint import constraint
from lightllm_grpc.server.errors import RequestError, invalid
from lightllm_grpc.server.tokenizer import PromptTokenizer
from lightllm_grpc.text.stop import StopStringMatcher

MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20
MAX_REQUEST_ID_CHARS = 256
MAX_CHAT_MESSAGES = 1024
MAX_ROLE_BYTES = 64
# Prompt text (text, or all chat roles and contents together) is refused above this many
# UTF-8 bytes per token of the model's context, before any tokenization: a prompt that
# could fit the context is far below it, and tokenizing megabytes only to refuse them
# would cost seconds of CPU per request.
TEXT_BYTES_PER_CONTEXT_TOKEN = 32
MIN_TEXT_BYTES = 64 * 1024


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_context: int
    kv_capacity: int
    default_max_new_tokens: int
    max_n: int = 16
    # Values for sampling fields a request leaves unset (the model's generation_config.json).
    default_sampling: SamplingOptions = dataclasses.field(default_factory=SamplingOptions)

    @property
    def max_text_bytes(self) -> int:
        return max(MIN_TEXT_BYTES, TEXT_BYTES_PER_CONTEXT_TOKEN * self.max_context)


class RequestBuilder:
    def __init__(self, tokenizer: PromptTokenizer, limits: Limits, compact_json: bool = False) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.compact_json = compact_json  # --json-whitespace compact

    def build(self, msg: pb.GenerateRequest) -> list[Request]:
        """The request's completions: one ``Request`` each, sharing its id and prompt."""
        request_id = _request_id(msg.request_id)
        n = self._n(msg)
        prompt_ids = self.prompt_ids(msg)
        stopping = self._stopping(msg.stopping, len(prompt_ids))
        limits = self.limits
        sampling = _sampling(msg.sampling, limits.default_sampling, limits.vocab_size)
        output = _output(msg.response)
        output_constraint = constraint(msg, self.compact_json)
        reqs = [
            Request(
                request_id=request_id,
                prompt_ids=prompt_ids,
                sampling=_nth_seed(sampling, i, msg.sampling.HasField("seed")),
                stopping=stopping,
                output=output,
                index=i,
                priority=msg.priority,
                constraint=output_constraint,
            )
            for i in range(n)
        ]
        self._check_fits(reqs[0])
        for req in reqs[1:]:
            req.queue = reqs[0].queue  # one stream carries every completion
        if stopping.stop:
            for req in reqs:
                req.stop_matcher = StopStringMatcher(list(stopping.stop), stopping.include_stop_str_in_output)
        return reqs

    def _n(self, msg: pb.GenerateRequest) -> int:
        n = msg.n if msg.HasField("n") else 1
        if not 1 <= n <= self.limits.max_n:
            raise invalid(f"n must be in [1, {self.limits.max_n}] (the server's --max-n), got {n}")
        return n

    def _check_fits(self, req: Request) -> None:
        stopping, prompt_ids = req.stopping, req.prompt_ids
        if req.kv_reservation > self.limits.kv_capacity:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the prompt ({len(prompt_ids)} tokens) plus stopping.max_new_tokens "
                f"({stopping.max_new_tokens}) needs {req.kv_reservation} KV tokens but the server's "
                f"KV pool holds {self.limits.kv_capacity}; shorten the prompt or lower max_new_tokens",
            )

    def prompt_ids(self, msg: pb.GenerateRequest) -> list[int]:
        kind = msg.WhichOneof("prompt")
        if kind == "text":
            check_text_bytes(msg.text, "text", self.limits.max_text_bytes)
            ids = self.tokenizer.encode(msg.text)
        elif kind == "token_ids":
            self._check_prompt_len(len(msg.token_ids.ids))  # before copying millions of ids
            ids = list(msg.token_ids.ids)
            self._check_ids(ids, "prompt.token_ids")
        elif kind == "chat":
            ids = self.tokenizer.encode_chat(*chat_messages(msg.chat, self.limits.max_text_bytes))
        else:
            raise invalid("prompt: set one of text, token_ids or chat")
        if not ids:
            raise invalid("prompt is empty (it tokenized to zero tokens)")
        self._check_prompt_len(len(ids))
        return ids

    def tokenize(self, msg: pb.TokenizeRequest) -> pb.TokenizeResponse:
        """The ``Tokenize`` RPC's answer; its size is bounded by the same byte limit as prompts."""
        tok, limit = self.tokenizer, self.limits.max_text_bytes
        kind = msg.WhichOneof("input")
        if kind == "text":
            check_text_bytes(msg.text, "text", limit)
            add = msg.add_special_tokens if msg.HasField("add_special_tokens") else True
            ids = tok.encode(msg.text, add_special_tokens=add)
        elif kind == "chat":
            ids = tok.encode_chat(*chat_messages(msg.chat, limit))
        else:
            raise invalid("input: set text or chat")
        return pb.TokenizeResponse(ids=ids, tokens=tok.tokens(ids))

    def _check_prompt_len(self, n: int) -> None:
        if n >= self.limits.max_context:
            raise invalid(
                f"prompt is {n} tokens; the model's context is {self.limits.max_context} tokens "
                "and at least one must be left for output"
            )

    def _check_ids(self, ids: list[int], field: str) -> None:
        bad = [i for i in ids if i >= self.limits.vocab_size]
        if bad:
            raise invalid(f"{field}: id {bad[0]} is outside the vocabulary (size {self.limits.vocab_size})")

    def _stopping(self, s: pb.StoppingCriteria, prompt_len: int) -> StopOptions:
        room = self.limits.max_context - prompt_len
        if s.HasField("max_new_tokens"):
            max_new = s.max_new_tokens
            if max_new < 1:
                raise invalid("stopping.max_new_tokens must be >= 1")
            if max_new > room:
                raise invalid(
                    f"stopping.max_new_tokens is {max_new} but the prompt ({prompt_len} tokens) leaves "
                    f"room for {room} in the model's context of {self.limits.max_context}"
                )
        else:
            max_new = min(self.limits.default_max_new_tokens, room)
        if s.min_new_tokens > max_new:
            raise invalid(f"stopping.min_new_tokens ({s.min_new_tokens}) exceeds max_new_tokens ({max_new})")
        _check_stop_strings(s.stop)
        if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise invalid(
                f"stopping.stop_token_ids has {len(s.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} "
                "are allowed"
            )
        self._check_ids(list(s.stop_token_ids), "stopping.stop_token_ids")
        return StopOptions(
            max_new_tokens=max_new,
            min_new_tokens=s.min_new_tokens,
            stop=tuple(s.stop),
            stop_token_ids=tuple(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            include_stop_str_in_output=s.include_stop_str_in_output,
        )


def check_text_bytes(text: str, field: str, limit: int) -> int:
    """The UTF-8 size of ``text``, refused (naming ``field``) above ``limit``."""
    n = len(text.encode())
    if n > limit:
        raise invalid(f"{field} is {n} bytes; at most {limit} are allowed")
    return n


def chat_messages(chat: pb.Chat, max_bytes: int) -> tuple[list[dict[str, str]], bool]:
    """The messages for the chat template; at most ``max_bytes`` of roles and contents in all."""
    if not chat.messages:
        raise invalid("chat.messages is empty")
    if len(chat.messages) > MAX_CHAT_MESSAGES:
        raise invalid(f"chat.messages has {len(chat.messages)} messages; at most {MAX_CHAT_MESSAGES}")
    total = 0
    for i, m in enumerate(chat.messages):
        if not m.role:
            raise invalid(f"chat.messages[{i}].role is empty")
        check_text_bytes(m.role, f"chat.messages[{i}].role", MAX_ROLE_BYTES)
        total += check_text_bytes(m.content, f"chat.messages[{i}].content", max_bytes)
        if total > max_bytes:
            raise invalid(f"chat.messages hold more than {max_bytes} bytes of content in all")
    messages = [{"role": m.role, "content": m.content} for m in chat.messages]
    add_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
    return messages, add_prompt


def _request_id(given: str) -> str:
    if len(given) > MAX_REQUEST_ID_CHARS:
        raise invalid(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
    return given or uuid.uuid4().hex


def _sampling(s: pb.SamplingParams, defaults: SamplingOptions, vocab_size: int) -> SamplingOptions:
    try:
        return resolve(s, defaults, vocab_size)
    except ValueError as e:
        raise invalid(str(e)) from None


def _nth_seed(sampling: SamplingOptions, i: int, given: bool) -> SamplingOptions:
    """Completion i of a seeded request uses seed + i; unseeded ones each draw their own."""
    if i == 0:
        return sampling
    seed = (sampling.seed + i) % (1 << 64) if given and sampling.seed is not None else secrets.randbits(63)
    return dataclasses.replace(sampling, seed=seed)


def _check_stop_strings(stops: Sequence[str]) -> None:
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"stopping.stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed")
    for i, stop in enumerate(stops):
        if not stop:
            raise invalid(f"stopping.stop[{i}] is empty")
        if len(stop.encode()) > MAX_STOP_BYTES:
            raise invalid(f"stopping.stop[{i}] is longer than {MAX_STOP_BYTES} bytes")


def _output(r: pb.ResponseOptions) -> OutputOptions:
    if r.top_logprobs > MAX_TOP_LOGPROBS:
        raise invalid(f"response.top_logprobs must be <= {MAX_TOP_LOGPROBS}, got {r.top_logprobs}")
    return OutputOptions(
        return_token_ids=r.return_token_ids if r.HasField("return_token_ids") else True,
        logprobs=r.logprobs or r.top_logprobs > 0,
        top_logprobs=r.top_logprobs,
        skip_special_tokens=r.skip_special_tokens if r.HasField("skip_special_tokens") else True,
        spaces_between_special_tokens=r.spaces_between_special_tokens,
        prompt_logprobs=r.prompt_logprobs,
    )
