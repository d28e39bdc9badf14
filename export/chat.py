"""Chat template detection: map a jinja chat template to a style run.c renders itself."""
from __future__ import annotations

import datetime

from kvc.format import CHAT_CHATML, CHAT_LLAMA2, CHAT_LLAMA3, CHAT_NONE, ChatTemplate, Tokenizer

from .common import warn

# style -> (marker in the jinja, end-of-turn token text or None for eos, system start, system end)
STYLES = [
    (CHAT_CHATML, "<|im_start|>", "<|im_end|>", "<|im_start|>system\n", "<|im_end|>"),
    (CHAT_LLAMA3, "<|start_header_id|>", "<|eot_id|>", "<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
    (CHAT_LLAMA2, "[INST]", None, "<<SYS>>\n", "\n<</SYS>>"),
]


def render(jinja: str, messages: list[dict], add_generation_prompt: bool = False, **extra) -> str:
    """Render a chat template the way Hugging Face transformers does (sandboxed jinja2)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(jinja).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)


def default_system_prompt(jinja: str, start: str, end: str, bos: str = "", eos: str = "") -> str:
    """The system prompt the template inserts when the conversation has none ("" if none).

    Renders a conversation of one user message "X" and takes the text between `start` and `end`.
    """
    try:
        text = render(jinja, [{"role": "user", "content": "X"}], bos_token=bos, eos_token=eos)
    except Exception as e:  # a template that cannot render still exports, without a default
        warn(f"could not render the chat template ({e}); no default system prompt")
        return ""
    i = text.find(start)
    if i < 0:
        return ""
    j = text.find(end, i + len(start))
    if j < 0:
        return ""
    return text[i + len(start):j]


def detect_template(jinja: str | None, tokenizer: Tokenizer | None, eos_id: int, bos: str = "", eos: str = "") -> ChatTemplate:
    """A ChatTemplate for `jinja`: style from its markers, end-of-turn id from the tokenizer,
    default system prompt by rendering. Unknown templates keep their text with style CHAT_NONE."""
    if not jinja:
        return ChatTemplate()
    for style, marker, eot_text, sys_start, sys_end in STYLES:
        if marker not in jinja:
            continue
        if eot_text is None:
            eot = eos_id
        else:
            eot = find_token(tokenizer, eot_text)
            if eot < 0:
                warn(f"chat template uses {eot_text} but the vocabulary lacks it; chat style not set")
                return ChatTemplate(CHAT_NONE, -1, "", jinja)
        system = default_system_prompt(jinja, sys_start, sys_end, bos, eos)
        return ChatTemplate(style, eot, system, jinja)
    return ChatTemplate(CHAT_NONE, -1, "", jinja)


def find_token(tokenizer: Tokenizer | None, text: str) -> int:
    """Id of the piece whose bytes are exactly `text` (control tokens first), or -1."""
    if tokenizer is None:
        return -1
    want = text.encode("utf-8")
    found = -1
    for i, (p, t) in enumerate(zip(tokenizer.pieces, tokenizer.types)):
        if p == want:
            if t != 1:  # prefer a control/user-defined token over a normal one
                return i
            if found < 0:
                found = i
    return found


def token_text(tokenizer: Tokenizer | None, i: int) -> str:
    """A token's text for the template's bos_token/eos_token variables ("" if unknown)."""
    if tokenizer is None or not 0 <= i < len(tokenizer.pieces):
        return ""
    return tokenizer.pieces[i].decode("utf-8", "replace")
