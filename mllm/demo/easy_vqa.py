"""easy-VQA (PyPI `easy-vqa`) → per-image annotations and typed question-answer records.

easy-VQA ships questions, not labels: each 64×64 image shows one coloured shape,
and its colour and shape are recovered here from the answers to that image's
questions ("what color is the triangle?" → blue triangle; "is there not a red
shape?" → no → red). About one image in ten has questions that leave its colour
or shape open; that attribute stays `None` (never guessed), and contradicting
answers stop the build naming the image.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
QUESTION_TYPES = ("yes/no", "color", "shape")

_WORD = re.compile(r"[a-z]+")
_NEGATION = re.compile(r"\b(not|no)\b")


@dataclass(frozen=True)
class Question:
    image_id: int
    question: str
    answer: str

    @property
    def type(self) -> str:
        return question_type(self.answer)

    @property
    def negated(self) -> bool:
        return bool(_NEGATION.search(self.question))

    @property
    def asks_about(self) -> str:
        """`color` or `shape`: which attribute a yes/no question names ("is there a red shape?" → color)."""
        words = set(_WORD.findall(self.question))
        return "color" if words & set(COLORS) else "shape"

    def answer_for(self, note: Annotation) -> str | None:
        """This question's answer about an image annotated `note` (None when `note` lacks what it needs)."""
        kind = self.type if self.type != "yes/no" else self.asks_about
        value = note.color if kind == "color" else note.shape
        if value is None or self.type != "yes/no":
            return value
        named = set(_WORD.findall(self.question)) & set(COLORS if kind == "color" else SHAPES)
        return "yes" if (value in named) != self.negated else "no"


@dataclass(frozen=True)
class Annotation:
    color: str | None
    shape: str | None

    @property
    def complete(self) -> bool:
        return self.color is not None and self.shape is not None

    def caption(self) -> str:
        if not self.complete:
            raise ValueError(f"cannot caption a partly known image {self}")
        return f"A {self.color} {self.shape}."


def question_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    raise ValueError(f"easy-VQA answer {answer!r} is none of yes/no, {COLORS}, {SHAPES}")


def load_questions(split: str) -> list[Question]:
    """All questions of `split` (train | test) from the installed easy-vqa package."""
    import easy_vqa  # optional dependency (the demo extra)

    getter = {"train": easy_vqa.get_train_questions, "test": easy_vqa.get_test_questions}.get(split)
    if getter is None:
        raise ValueError(f"easy-VQA split must be train or test, got {split!r}")
    texts, answers, image_ids = getter()
    return [Question(int(i), q, a) for q, a, i in zip(texts, answers, image_ids, strict=True)]


def image_paths(split: str) -> dict[int, str]:
    import easy_vqa

    return {"train": easy_vqa.get_train_image_paths, "test": easy_vqa.get_test_image_paths}[split]()


def annotate(questions: list[Question]) -> dict[int, Annotation]:
    """Colour and shape of every image, resolved from the answers to its questions."""
    seen: dict[str, dict[int, set[str]]] = {"color": defaultdict(set), "shape": defaultdict(set)}
    ruled_out: dict[str, dict[int, set[str]]] = {"color": defaultdict(set), "shape": defaultdict(set)}
    for q in questions:
        words = set(_WORD.findall(q.question))
        named_color = words & set(COLORS)
        named_shape = words & set(SHAPES)
        if q.type in ("color", "shape"):
            seen[q.type][q.image_id].add(q.answer)
            # "what color is the triangle?" / "what is the blue shape?" also name the other attribute.
            other, named = ("shape", named_shape) if q.type == "color" else ("color", named_color)
            seen[other][q.image_id].update(named)
            continue
        kind, named = ("color", named_color) if named_color else ("shape", named_shape)
        present = (q.answer == "yes") != q.negated
        (seen if present else ruled_out)[kind][q.image_id].update(named)
    image_ids = sorted({q.image_id for q in questions})
    return {
        i: Annotation(
            _resolve(i, "color", COLORS, seen, ruled_out), _resolve(i, "shape", SHAPES, seen, ruled_out)
        )
        for i in image_ids
    }


def _resolve(image_id: int, kind: str, values: tuple[str, ...], seen, ruled_out) -> str | None:
    """The one value the answers allow, or None when several remain."""
    found, excluded = seen[kind][image_id], ruled_out[kind][image_id]
    if len(found) > 1 or found & excluded:
        raise ValueError(
            f"easy-VQA image {image_id}: contradicting answers about its {kind} "
            f"(present: {sorted(found)}, absent: {sorted(excluded)})"
        )
    candidates = found or (set(values) - excluded)
    return next(iter(candidates)) if len(candidates) == 1 else None
