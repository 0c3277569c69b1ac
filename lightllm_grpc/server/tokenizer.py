"""The model's tokenizer: text and chat prompts to ids, with clear errors.

Special-token text (``</s>``, ``<|system|>``) in a ``text`` prompt is parsed as control
tokens: the caller writes the whole prompt, template included. In chat message content it
is, by default (``--chat-content-special-tokens plain``), tokenized as the plain characters
it is, so an end user's message cannot forge a role switch or an end of turn; the template's
own special tokens are still parsed. ``parse`` restores what Hugging Face's
``apply_chat_template`` + ``encode`` do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from tokenizers import Tokenizer

from lightllm_grpc.server.errors import RequestError, invalid

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHAT_CONTENT_SPECIAL_TOKENS = ("plain", "parse")


class PromptTokenizer:
    def __init__(self, model_dir: Path, chat_content_special_tokens: str = "plain") -> None:
        if chat_content_special_tokens not in CHAT_CONTENT_SPECIAL_TOKENS:
            raise ValueError(f"chat_content_special_tokens must be one of {CHAT_CONTENT_SPECIAL_TOKENS}")
        # Imported here, not with the module: transformers takes ~1 s to import, and the
        # server builds its tokenizer on a thread while the shards start (server/app.py), so
        # the coordinator spawns its shards that much sooner.
        from transformers import AutoTokenizer

        self.hf: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(model_dir))
        # The Rust tokenizer behind the fast HF one: batch decoding without Python overhead.
        self.backend = self.hf.backend_tokenizer
        special = {i: t.content for i, t in self.hf.added_tokens_decoder.items() if t.special}
        self._special_ids = frozenset(special)
        self._special_text = _alternation(special.values())
        self._plain: Tokenizer | None = None
        if chat_content_special_tokens == "plain" and special:
            # A copy that reads special-token text as characters; the shared one is never mutated
            # (the detokenizer uses it from the event loop while this runs on the tokenizer thread).
            self._plain = Tokenizer.from_str(self.backend.to_str())
            self._plain.encode_special_tokens = True

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        if not self.has_chat_template:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this model's tokenizer has no chat template; send the prompt as text or token_ids",
            )
        try:
            rendered = self.hf.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as exc:  # jinja errors of arbitrary types come from user templates
            raise invalid(f"chat: the chat template failed on these messages: {exc}") from exc
        spans = self._content_spans(rendered, messages)
        if not spans:
            # The template already wrote BOS where the model wants it.
            return self.encode(rendered, add_special_tokens=False)
        return self._encode_with_plain_spans(rendered, spans)

    def _content_spans(self, rendered: str, messages: list[dict[str, str]]) -> list[tuple[int, int]]:
        """Where in ``rendered`` the contents holding special-token text are (plain mode only)."""
        if self._plain is None or self._special_text is None:
            return []
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            content = m["content"]
            start = rendered.find(content, cursor)
            if start < 0:  # templates may trim content
                content = content.strip()
                start = rendered.find(content, cursor)
            if start < 0:
                if self._special_text.search(m["content"]):
                    raise invalid(
                        f"chat.messages[{i}].content holds special-token text and the chat template "
                        "rewrites it, so it cannot be kept plain"
                    )
                continue
            cursor = start + len(content)
            if self._special_text.search(content):
                spans.append((start, cursor))
        return spans

    def _encode_with_plain_spans(self, rendered: str, spans: list[tuple[int, int]]) -> list[int]:
        """Tokenize once; a special token that came from user content becomes its plain characters."""
        assert self._plain is not None
        enc = self.backend.encode(rendered, add_special_tokens=False)
        ids: list[int] = []
        for token, (a, b) in zip(enc.ids, enc.offsets):
            if token in self._special_ids and any(s <= a and b <= e for s, e in spans):
                ids += self._plain.encode(rendered[a:b], add_special_tokens=False).ids
            else:
                ids.append(token)
        return ids

    def tokens(self, ids: list[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(ids))


def _alternation(texts: Iterable[str]) -> re.Pattern[str] | None:
    longest_first = sorted({t for t in texts if t}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, longest_first))) if longest_first else None
