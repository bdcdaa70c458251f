"""Chat templates: render a conversation to text plus the character spans the loss is computed on.

A span covers one assistant turn's content and its end-of-turn token, nothing
else. `auto` uses the tokenizer's own `chat_template`, rendered on growing
prefixes of the conversation so each turn's text (and so each assistant span)
is known exactly; the named built-ins build the text turn by turn directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jinja2 import TemplateError

from mllm.config import IMAGE_PLACEHOLDER
from mllm.data.errors import BadSampleError
from mllm.registry import Registry


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]
    """Supervised character ranges [start, end) of `text`, in order, not overlapping."""


class Template:
    """Turns messages into text and supervised spans for one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> Rendered:
        raise NotImplementedError


def _special_tokens(tokenizer) -> list[str]:
    special = set(tokenizer.all_special_tokens)
    special.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((s for s in special if s), key=len, reverse=True)


class ChatTemplate(Template):
    """The tokenizer's own Jinja `chat_template`; the end-of-turn token is the first special token after the content."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"template 'auto': the tokenizer ({tokenizer.name_or_path or type(tokenizer).__name__}) has no chat_template; "
                f"set `template:` to a built-in: {', '.join(n for n in TEMPLATES.names() if n != 'auto')}"
            )
        specials = _special_tokens(tokenizer)
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    def _apply(self, messages, add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as e:  # e.g. the template's own raise_exception("roles must alternate")
            raise BadSampleError(
                "template_error", f"the chat template rejects this conversation: {e}"
            ) from None

    def render(self, messages, add_generation_prompt=False) -> Rendered:
        # One render of the whole conversation, plus one per answer of the conversation up to that answer with
        # the generation prompt: the latter must be a prefix of the former (what the model sees before each
        # answer in training is exactly what it is prompted with at inference), and the answer follows it.
        full = self._apply(messages, add_generation_prompt)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self._apply(messages[:i], True) if i else ""
            last = i == len(messages) - 1 and not add_generation_prompt
            turn = full if last else self._apply(messages[: i + 1], False)
            if not (full.startswith(head) and full.startswith(turn)):
                raise BadSampleError("template_mismatch", self._unstable(i))
            turn_end = len(turn)
            spans.append(self._answer_span(full, len(head), turn_end, m["content"], i))
        return Rendered(full, spans)

    def _answer_span(self, text: str, start: int, turn_end: int, content: str, turn: int) -> tuple[int, int]:
        """From the answer's first character through the first special token after it, within its own turn."""
        body = content.strip()
        pos = text.find(body, start, turn_end)
        if pos < 0:
            raise BadSampleError(
                "template_mismatch",
                f"turn {turn}: the chat template does not render the assistant content verbatim",
            )
        match = self._special_re.search(text, pos + len(body), turn_end) if self._special_re else None
        if match is None:
            raise BadSampleError(
                "template_mismatch",
                f"turn {turn}: the chat template puts no end-of-turn special token after the assistant content, "
                "so the model could never learn to stop; use a built-in template (template: chatml | llama3 | vicuna_v1)",
            )
        return pos, match.end()

    @staticmethod
    def _unstable(turn: int) -> str:
        return (
            f"turn {turn}: the tokenizer's chat_template renders the conversation before this answer differently "
            "once later turns are added, "
            "so what training sees before an answer differs from the inference prompt; use a built-in template (template: chatml | llama3 | vicuna_v1)"
        )


@dataclass(frozen=True)
class TurnFormat:
    """A built-in template, turn by turn. `{eos}` / `{bos}` are the tokenizer's; `{content}` the message text."""

    begin: str
    system: str
    user: str
    assistant_head: str
    assistant_end: str
    """The supervised end-of-turn text right after an answer."""
    after_answer: str = ""
    generation_prompt: str | None = None
    """What the prompt for generation ends with (default: assistant_head)."""
    default_system: str | None = None
    images_only_prompt: bool = False
    """Captioning (`plain`): user turns contribute only their images, no text."""


class BuiltinTemplate(Template):
    def __init__(self, tokenizer, fmt: TurnFormat):
        super().__init__(tokenizer)
        self.fmt = fmt
        if "{eos}" in fmt.assistant_end and not tokenizer.eos_token:
            raise ValueError(
                "this template ends answers with the tokenizer's eos_token, but the tokenizer has none"
            )
        self._tokens = {"bos": tokenizer.bos_token or "", "eos": tokenizer.eos_token or ""}

    def _fill(self, pattern: str, content: str = "") -> str:
        return pattern.format(content=content, **self._tokens)

    def render(self, messages, add_generation_prompt=False) -> Rendered:
        f = self.fmt
        parts = [self._fill(f.begin)]
        if f.default_system is not None and not any(m["role"] == "system" for m in messages):
            parts.append(self._fill(f.system, f.default_system))
        spans, n = [], sum(map(len, parts))
        for m in messages:
            if m["role"] == "assistant":
                head = self._fill(f.assistant_head)
                answer = m["content"] + self._fill(f.assistant_end)
                spans.append((n + len(head), n + len(head) + len(answer)))
                piece = head + answer + self._fill(f.after_answer)
            elif f.images_only_prompt:
                piece = (
                    IMAGE_PLACEHOLDER * m["content"].count(IMAGE_PLACEHOLDER) if m["role"] == "user" else ""
                )
            else:
                piece = self._fill(f.system if m["role"] == "system" else f.user, m["content"])
            parts.append(piece)
            n += len(piece)
        if add_generation_prompt:
            parts.append(
                self._fill(f.generation_prompt if f.generation_prompt is not None else f.assistant_head)
            )
        return Rendered("".join(parts), spans)


BUILTIN_FORMATS: dict[str, TurnFormat] = {
    # LLaVA stage-1 captioning: the image(s), then the caption; user text such as "Describe the image" is dropped.
    "plain": TurnFormat(
        begin="{bos}", system="", user="", assistant_head="", assistant_end="{eos}", images_only_prompt=True
    ),
    # Vicuna v1 / LLaVA-1.5 `conv_vicuna_v1`: answers follow "ASSISTANT:" after a space, end with </s>.
    "vicuna_v1": TurnFormat(
        begin="{bos}",
        system="{content} ",
        user="USER: {content} ",
        assistant_head="ASSISTANT: ",
        assistant_end="{eos}",
        generation_prompt="ASSISTANT:",
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
    ),
    "chatml": TurnFormat(
        begin="",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_head="<|im_start|>assistant\n",
        assistant_end="<|im_end|>",
        after_answer="\n",
    ),
    "llama3": TurnFormat(
        begin="{bos}",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_head="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_end="<|eot_id|>",
    ),
}

TEMPLATES: Registry = Registry("chat template")
TEMPLATES.register("auto")(ChatTemplate)
for _name, _fmt in BUILTIN_FORMATS.items():
    TEMPLATES.register(_name)(lambda tokenizer, _fmt=_fmt: BuiltinTemplate(tokenizer, _fmt))


def get_template(name: str, tokenizer) -> Template:
    return TEMPLATES.get(name)(tokenizer)
