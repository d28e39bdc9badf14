"""OpenAI's response objects: chat completions, text completions, their stream chunks, and usage."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

FINGERPRINT = "kvc"


@dataclass
class Reply:
    """What one response is: chat or text completion, its id, its creation time and the model's name."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}

    def complete(self, choices: list[tuple[str, str]], usage: dict[str, Any]) -> dict[str, Any]:
        """The whole response: choices as (text, finish_reason), in index order."""
        if self.chat:
            items = [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": finish} for i, (text, finish) in enumerate(choices)]
            return {**self._head("chat.completion"), "choices": items, "usage": usage}
        items = [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                 for i, (text, finish) in enumerate(choices)]
        return {**self._head("text_completion"), "choices": items, "usage": usage}

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None, *, role: bool = False,
              usage_field: bool = False) -> dict[str, Any]:
        """A stream chunk of choice index: a chat delta (role: the first one, with the role) or a
        completion's text; finish_reason on the last one. usage_field: the "usage": null that every
        chunk carries when the stream ends with a usage chunk."""
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            out = {**self._head("text_completion"), "choices": [choice]}
        if usage_field:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        """The stream's last chunk with stream_options.include_usage: no choices, the usage."""
        name = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(name), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens: prompt tokens whose K/V the cache already held."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
