"""The Jinja chat template equivalent to a checkpoint's template, for processors outside mllm.

`auto` already is the tokenizer's Jinja template. A built-in `TurnFormat` is rendered to Jinja piece by
piece, with its literal text quoted as Jinja string literals (so braces in it stay text).
"""

from __future__ import annotations

import json

from mllm.config import IMAGE_PLACEHOLDER
from mllm.data.templates import BUILTIN_FORMATS


def _lit(text: str) -> str:
    return "{{ " + json.dumps(text) + " }}" if text else ""


def _piece(pattern: str, tokens: dict[str, str], content_expr: str) -> str:
    """`pattern` with `{bos}`/`{eos}` filled and `{content}` → the Jinja expression `content_expr`."""
    before, sep, after = pattern.format(content="\x00", **tokens).partition("\x00")
    return _lit(before) + ("{{ " + content_expr + " }}" if sep else "") + _lit(after)


def turn_format_jinja(fmt, tokenizer) -> str:
    tokens = {"bos": tokenizer.bos_token or "", "eos": tokenizer.eos_token or ""}
    out = [_piece(fmt.begin, tokens, "")]
    if fmt.default_system is not None:
        system = _piece(fmt.system, tokens, json.dumps(fmt.default_system))
        out.append(
            "{%- if not (messages | selectattr('role', 'equalto', 'system') | list) -%}"
            + system
            + "{%- endif -%}"
        )
    if fmt.images_only_prompt:
        user = (
            "{{ "
            + json.dumps(IMAGE_PLACEHOLDER)
            + " * (m['content'].split("
            + json.dumps(IMAGE_PLACEHOLDER)
            + ") | length - 1) }}"
        )
    else:
        user = _piece(fmt.user, tokens, "m['content']")
    assistant = (
        _piece(fmt.assistant_head, tokens, "") + "{{ m['content'] }}" + _piece(fmt.assistant_end, tokens, "")
    )
    assistant += _piece(fmt.after_answer, tokens, "")
    system_turn = "" if fmt.images_only_prompt else _piece(fmt.system, tokens, "m['content']")
    out.append(
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'assistant' -%}"
        + assistant
        + "{%- elif m['role'] == 'system' -%}"
        + system_turn
        + "{%- else -%}"
        + user
        + "{%- endif -%}{%- endfor -%}"
    )
    prompt = fmt.generation_prompt if fmt.generation_prompt is not None else fmt.assistant_head
    out.append("{%- if add_generation_prompt -%}" + _piece(prompt, tokens, "") + "{%- endif -%}")
    return "".join(out)


def template_jinja(name: str, tokenizer) -> str | None:
    """Jinja for template `name` (`auto` or a built-in), or None when it has none."""
    if name == "auto":
        return getattr(tokenizer, "chat_template", None) or None
    fmt = BUILTIN_FORMATS.get(name)
    return turn_format_jinja(fmt, tokenizer) if fmt is not None else None
