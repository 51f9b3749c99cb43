"""Tokenizer for the runtime: the `tokenizers` library and the model's own chat template.

A deployed model needs no transformers: `tokenizer.json` is read by `tokenizers`, the chat
template (`chat_template.jinja` or `tokenizer_config.json`) is rendered with jinja2, and eos
ids come from `generation_config.json` / `kvfuse-export.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvfuse.errors import KvfuseError


class Text:
    """Encode prompts (raw or chat) and decode tokens, incrementally for streaming."""

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        path = directory / "tokenizer.json"
        if not path.is_file():
            raise KvfuseError(
                f"{directory} has no tokenizer.json; keep the export's tokenizer "
                "files beside the optimized model"
            )
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a plain Exception for a damaged file
            reason = (str(error).strip().splitlines() or [""])[0][:200]
            raise KvfuseError(
                f"{path} is not a readable tokenizer ({reason}); copy the export's "
                "tokenizer.json beside the optimized model"
            ) from error
        self.config = _json(directory / "tokenizer_config.json")
        self.chat_template = _chat_template(directory, self.config)
        try:
            self.eos_ids = _eos_ids(directory, self.config, self.tokenizer)
        except (AttributeError, TypeError) as error:  # valid JSON of an unexpected shape
            raise KvfuseError(
                f"{directory}: the eos token in kvfuse-export.json, generation_config.json or "
                "tokenizer_config.json is not what an export writes; restore the export's files"
            ) from error

    def encode(self, prompt: str, chat: bool) -> list[int]:
        """Token ids of `prompt`; with `chat`, wrapped as one user turn by the chat template."""
        if chat and self.chat_template is not None:
            return self.encode_conversation([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt).ids

    def encode_conversation(self, messages: list[dict]) -> list[int]:
        """Token ids of a whole conversation, ending with the assistant's turn to speak."""
        return self.tokenizer.encode(self.render(messages), add_special_tokens=False).ids

    def render(self, messages: list[dict]) -> str:
        import jinja2

        environment = jinja2.Environment(trim_blocks=False, lstrip_blocks=False)
        template = environment.from_string(self.chat_template)
        specials = {k: self.config.get(k) for k in ("bos_token", "eos_token")}
        return template.render(messages=messages, add_generation_prompt=True, **specials)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns a growing token list into text deltas, holding back incomplete UTF-8 sequences
    (a multi-byte character split over tokens decodes to U+FFFD until it is whole).

    Only a short window is decoded per token: the tokens since the last emitted boundary,
    with the one before as context (so a leading-space merge decodes as it would in full)."""

    def __init__(self, text: Text) -> None:
        self.text, self.tokens = text, []
        self.prefix = self.read = 0  # window start; end of what was already emitted

    def push(self, token: int) -> str:
        self.tokens.append(token)
        before = self.text.decode(self.tokens[self.prefix : self.read])
        after = self.text.decode(self.tokens[self.prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return after[len(before) :]

    def flush(self) -> str:
        """What is still held back once no more tokens come (an incomplete UTF-8 sequence
        decodes as U+FFFD, as it does in a full decode)."""
        before = self.text.decode(self.tokens[self.prefix : self.read])
        after = self.text.decode(self.tokens[self.prefix :])
        self.prefix = self.read = len(self.tokens)
        return after[len(before) :]


def _json(path: Path) -> dict:
    """A companion JSON file's object, {} if absent; one line if it is damaged."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise KvfuseError(
            f"{path} is not readable JSON ({type(error).__name__}); restore the export's copy"
        ) from error
    if not isinstance(record, dict):
        raise KvfuseError(f"{path} holds no JSON object; restore the export's copy")
    return record


def _chat_template(directory: Path, config: dict) -> str | None:
    template_file = directory / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text()
    template = config.get("chat_template")
    return template if isinstance(template, str) else None


def _eos_ids(directory: Path, config: dict, tokenizer) -> set[int]:
    """eos from the export's facts or generation_config (which may list several), else the
    tokenizer config's eos token."""
    facts = _json(directory / "kvfuse-export.json").get("model", {})
    if facts.get("eos_token_ids"):
        return set(facts["eos_token_ids"])
    eos = _json(directory / "generation_config.json").get("eos_token_id")
    if eos is not None:
        return set(eos) if isinstance(eos, list) else {eos}
    token = config.get("eos_token")
    token = token.get("content") if isinstance(token, dict) else token
    found = tokenizer.token_to_id(token) if token else None
    return {found} if found is not None else set()
