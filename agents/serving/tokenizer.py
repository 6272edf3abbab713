"""Text <-> token ids, and chat messages -> prompt, from a Hugging Face weights folder.

`tokenizer.json` is read with Hugging Face's `tokenizers` (the Rust tokenizer transformers
itself wraps); the chat template comes from `tokenizer_config.json` (`chat_template`) or
`chat_template.jinja`, and is rendered the way transformers renders it: jinja2's immutable
sandbox with `trim_blocks` and `lstrip_blocks`, `raise_exception` and a `tojson` filter, and
`messages`, `add_generation_prompt`, `bos_token`, `eos_token` in scope. Nothing is fetched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class TokenizerError(ValueError):
    """The weights folder has no usable tokenizer, or a chat template failed."""


class TemplateError(TokenizerError):
    """The chat template refused the messages (`raise_exception`) or could not render them."""


def _special(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return value if isinstance(value, str) else None


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


@dataclass
class ServingTokenizer:
    """The tokenizer and chat template of one model."""

    tokenizer: Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None

    @classmethod
    def from_folder(cls, path: str | Path) -> ServingTokenizer:
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"no tokenizer.json in {folder} (a Hugging Face fast tokenizer)")
        config_file = folder / "tokenizer_config.json"
        config: dict[str, Any] = (
            json.loads(config_file.read_text()) if config_file.is_file() else {}
        )
        template = config.get("chat_template")
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {entry.get("name"): entry.get("template") for entry in template}
            template = named.get("default")
        return cls(
            tokenizer=Tokenizer.from_file(str(tokenizer_file)),
            chat_template=template if isinstance(template, str) else None,
            bos_token=_special(config.get("bos_token")),
            eos_token=_special(config.get("eos_token")),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt text of a conversation (special tokens included as text)."""
        if self.chat_template is None:
            raise TemplateError("the model's tokenizer_config.json has no chat_template")
        try:
            template = _environment().from_string(self.chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as error:
            raise TemplateError(f"chat template failed: {error}") from error

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation; the template writes the special tokens itself."""
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, indent=indent, ensure_ascii=False
    )
    return env
