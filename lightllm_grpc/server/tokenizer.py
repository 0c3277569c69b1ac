"""The model's tokenizer: text and chat prompts to ids, with clear errors."""

from __future__ import annotations

from pathlib import Path

import grpc
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lightllm_grpc.server.errors import RequestError, invalid


class PromptTokenizer:
    def __init__(self, model_dir: Path) -> None:
        self.hf: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(model_dir))
        # The Rust tokenizer behind the fast HF one: batch decoding without Python overhead.
        self.backend = self.hf.backend_tokenizer

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
        # The template already wrote BOS where the model wants it.
        return self.encode(rendered, add_special_tokens=False)

    def tokens(self, ids: list[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(ids))
