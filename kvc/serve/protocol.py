"""OpenAI's request bodies checked and turned into GenerationRequests, and OpenAI-shaped errors.

Every check raises APIError, which the app sends as
{"error": {"message": ..., "type": "invalid_request_error", "param": ..., "code": ...}}. Fields this
server does not know are ignored (clients send them); fields it knows but does not implement with a
value that would change the answer (logprobs, tools, echo, penalties, logit_bias, ...) are refused
rather than ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .engine import GenerationRequest

MAX_N = 16  # choices per request (OpenAI allows 128; the choices run together, forked from one prompt)
MAX_STOPS = 16  # stop strings per request (OpenAI allows 4)
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error response: HTTP status, and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    """A 400 invalid_request_error."""
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ParsedRequest:
    """A checked request: what to generate, and how to answer."""

    generation: GenerationRequest
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


# -- JSON -------------------------------------------------------------------------------------------


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object (400 unless it is one)."""
    try:
        data = json.loads(body, parse_constant=_no_constant)  # NaN and Infinity are not JSON
    except (ValueError, RecursionError) as e:
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, got {_kind(data)}", code="invalid_json")
    return data


def _kind(value: Any) -> str:
    """A JSON type name, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _type_error(name: str, expected: str, value: Any) -> APIError:
    return bad(f"{name} must be {expected}, got {_kind(value)}", param=name, code="invalid_type")


# -- fields -----------------------------------------------------------------------------------------


def _int(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():  # 16.0 is an integer in JSON
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an integer", value)
    if not low <= value <= high:
        raise bad(f"{name} must be in {low}..{high}, got {value}", param=name)
    return value


def _float(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(name, "a number", value)
    if not low <= value <= high:  # JSON numbers may be huge ints: compare before converting
        raise bad(f"{name} must be in [{low:g}, {high:g}], got {value}", param=name)
    return float(value)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(name, "a boolean", value)
    return value


def _text(value: Any, name: str) -> str:
    """A string the model can take: no NUL characters, no lone surrogates (which are not UTF-8)."""
    if not isinstance(value, str):
        raise _type_error(name, "a string", value)
    if "\0" in value:
        raise bad(f"{name} contains a NUL character", param=name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"{name} is not valid Unicode (a lone surrogate)", param=name) from None
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _type_error("stop", "a string or an array of strings", value)
    if len(value) > MAX_STOPS:
        raise bad(f"stop has {len(value)} strings, at most {MAX_STOPS} are allowed", param="stop")
    return tuple(_text(s, "stop") for s in value if s != "")


def _stream_options(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _type_error("stream_options", "an object", options)
    if not stream:
        raise bad("stream_options is only allowed when stream is true", param="stream_options")
    return _bool(options, "include_usage", False)


def _refuse(body: dict, name: str, allowed: tuple = (None, False, 0, "", [])) -> None:
    """Refuse a field this server knows but does not implement, unless it asks for nothing."""
    value = body.get(name)
    if any(value is a or (type(value) is type(a) and value == a) for a in allowed):
        return
    raise bad(f"{name} is not supported by this server", param=name, code="unsupported_parameter")


def _sampling(body: dict, max_tokens_names: tuple[str, ...]) -> dict[str, Any]:
    """The sampling fields both endpoints share, as GenerationRequest arguments."""
    for name in ("frequency_penalty", "presence_penalty"):  # not implemented: only "none" passes
        _refuse(body, name, (None, 0, 0.0))
    _refuse(body, "logit_bias", (None, {}))
    max_tokens = None
    for name in max_tokens_names:  # the first one given wins (max_completion_tokens, then max_tokens)
        max_tokens = _int(body, name, None, 0, INT64_MAX)
        if max_tokens is not None:
            break
    seed = _int(body, "seed", None, INT64_MIN, INT64_MAX)
    return dict(
        max_tokens=max_tokens,
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_int(body, "top_k", 0, 0, 2**31 - 1),  # not OpenAI's; llama-server and vLLM take it
        seed=None if seed is None else seed % 2**64,  # negative seeds as their unsigned bits
        stop=_stop(body),
        n=_int(body, "n", 1, 1, MAX_N),
        ignore_eos=_bool(body, "ignore_eos", False),  # not OpenAI's; llama-server and vLLM take it
    )


# -- the endpoints ----------------------------------------------------------------------------------


def _content(value: Any, name: str, role: str) -> str:
    """A message's content: a string, or an array of {"type": "text", "text": ...} parts (joined)."""
    if value is None and role == "assistant":  # an assistant turn that only called tools
        return ""
    if isinstance(value, str):
        return _text(value, name)
    if not isinstance(value, list):
        raise _type_error(name, "a string or an array of content parts", value)
    texts = []
    for i, part in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(part, dict):
            raise _type_error(where, "an object", part)
        if part.get("type") != "text":
            raise bad(f"{where}: only text content parts are supported, got type {part.get('type')!r}",
                      param=where, code="unsupported_content")
        texts.append(_text(part.get("text"), f"{where}.text"))
    return "".join(texts)


def _messages(body: dict) -> tuple[tuple[str, str], ...]:
    messages = body.get("messages")
    if messages is None:
        raise bad("messages is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list):
        raise _type_error("messages", "an array", messages)
    if not messages:
        raise bad("messages must not be empty", param="messages")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _type_error(where, "an object", msg)
        role = msg.get("role")
        if not isinstance(role, str):
            raise _type_error(f"{where}.role", "a string", role)
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
        out.append((ROLES[role], _content(msg.get("content"), f"{where}.content", role)))
    return tuple(out)


def parse_chat(body: dict[str, Any]) -> ParsedRequest:
    """A /v1/chat/completions body, checked."""
    for name in ("tools", "functions"):
        _refuse(body, name)
    _refuse(body, "tool_choice", (None, "none", "auto"))
    _refuse(body, "logprobs")
    _refuse(body, "top_logprobs")
    _check_response_format(body)
    stream = _bool(body, "stream", False)
    generation = GenerationRequest(messages=_messages(body),
                                   **_sampling(body, ("max_completion_tokens", "max_tokens")))
    return ParsedRequest(generation, stream, _stream_options(body, stream))


def _prompt(body: dict) -> str:
    """A completion's prompt: a string or an array of one string."""
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise bad("prompt must be a string or an array of one string (token arrays and batches of "
                      "prompts are not supported)", param="prompt", code="unsupported_value")
        prompt = prompt[0]
    return _text(prompt, "prompt")


def parse_completion(body: dict[str, Any]) -> ParsedRequest:
    """A /v1/completions body, checked: prompt is a string or an array of one string."""
    prompt = _prompt(body)
    _refuse(body, "logprobs")
    _refuse(body, "echo")
    _refuse(body, "suffix")
    _refuse(body, "best_of", (None, 1))
    stream = _bool(body, "stream", False)
    generation = GenerationRequest(prompt=prompt, **_sampling(body, ("max_tokens",)))
    return ParsedRequest(generation, stream, _stream_options(body, stream))


# -- slots: a conversation's cache saved to and restored from a file --------------------------------


MAX_FILENAME_BYTES = 255  # a file name's limit on common file systems
SAVE_TEMP_SUFFIX = ".tmp.XXXXXX"  # a session is written to name + this, then renamed (run.c)


def slot_filename(body: dict[str, Any], saving: bool) -> str:
    """A /slots body's filename: a plain name inside the save folder, never a path (400 otherwise),
    of at most 255 bytes (saving: 244, which the temporary file's longer name needs)."""
    limit = MAX_FILENAME_BYTES - (len(SAVE_TEMP_SUFFIX) if saving else 0)
    name = body.get("filename")
    if name is None:
        raise bad("filename is required", param="filename", code="missing_required_parameter")
    if not isinstance(name, str):
        raise _type_error("filename", "a string", name)
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        size = -1
    problem = ("is empty" if not name else
               "is not valid Unicode (a lone surrogate)" if size < 0 else
               "contains a NUL character" if "\0" in name else
               "contains a path separator" if "/" in name or "\\" in name else
               'contains ".."' if ".." in name else
               "starts with a dot" if name.startswith(".") else
               f"is {size} bytes long, more than {limit}" if size > limit else None)
    if problem is not None:
        raise bad(f"filename {problem}: it must be a plain file name inside the server's --slot-save-path",
                  param="filename", code="invalid_filename")
    return name


def parse_slot_save(body: dict[str, Any]) -> tuple[GenerationRequest, str]:
    """A /slots save body's conversation: messages (a chat, as /v1/chat/completions takes it) or
    prompt (as /v1/completions), exactly one; with the name of the field given."""
    if ("messages" in body) == ("prompt" in body):
        raise bad("give messages (a chat) or prompt (a text), exactly one of them", param="messages",
                  code="missing_required_parameter")
    if "messages" in body:
        return GenerationRequest(messages=_messages(body)), "messages"
    return GenerationRequest(prompt=_prompt(body)), "prompt"


def _check_response_format(body: dict) -> None:
    value = body.get("response_format")
    if value is None:
        return
    if not isinstance(value, dict):
        raise _type_error("response_format", "an object", value)
    if value.get("type", "text") != "text":
        raise bad("response_format: only type text is supported", param="response_format",
                  code="unsupported_parameter")


def check_prompt_length(tokens: int, context: int, param: str) -> None:
    """400 for an empty prompt, or one that leaves no room in the context for a reply."""
    if tokens == 0:
        raise bad(f"{param} is empty: nothing to start from", param=param)
    if tokens >= context:
        raise bad(f"This model's maximum context length is {context} tokens, and your {param} has {tokens} "
                  f"tokens: at most {context - 1} leave room for a reply.", param=param,
                  code="context_length_exceeded")


def dumps(obj: Any) -> str:
    """Compact JSON, as OpenAI sends it (non-ASCII characters as themselves)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
