"""Evaluation items from LLaVA-format data (a file or a recipe): the question turn(s), the images, the reference answer.

The reference is the last assistant turn's text; the prompt is everything before it (earlier turns, with their
answers, are the conversation so far). An optional
per-sample `question_type` (or `type`) field groups the scores. `swap_images` builds the "blind" control:
each item is shown another item's image(s), never its own.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, replace

from mllm.config import IMAGE_PLACEHOLDER
from mllm.data.dataset import select_indices
from mllm.data.errors import BadSampleError
from mllm.data.recipe import load_recipe
from mllm.data.sample import ImageRef
from mllm.data.sources import open_source

TYPE_FIELDS = ("question_type", "type")


@dataclass
class EvalItem:
    id: str
    messages: list[dict[str, str]]
    """The prompt: every turn before the last assistant turn."""
    images: list[ImageRef]
    """Image references in placeholder order: paths relative to `image_root`, or image bytes (Parquet, shards)."""
    image_root: str
    reference: str
    type: str | None = None
    max_image_pixels: int = 89_478_485
    own_images: list[str] | None = None
    """After `swap_images`: paths of the images the sample really belongs with."""

    def image_paths(self) -> list[str]:
        """Where the images are, for the predictions file: a path, or `sha1:…` of image bytes held in the data."""
        return [
            os.path.normpath(os.path.join(self.image_root, ref))
            if isinstance(ref, str)
            else f"sha1:{hashlib.sha1(ref).hexdigest()}"
            for ref in self.images
        ]


def load_eval_items(
    path: str, limit: int | None = None, seed: int = 0, image_root: str | None = None
) -> list[EvalItem]:
    """Read every selected sample of a data file or recipe as an `EvalItem` (bad samples raise with their location).

    `seed` drives `sample: random:N` selections in a recipe, as in training; `image_root` (relative: to the
    current directory) replaces the recipe's, as `--image-root` does in training.
    """
    recipe = load_recipe(path, image_root=image_root)
    items: list[EvalItem] = []
    for spec in recipe.sources:
        source = open_source(spec)
        root = recipe.image_root_of(spec)
        for index in select_indices(spec, len(source), seed):
            try:
                items.append(_item(source, index, root, recipe.max_image_pixels))
            except BadSampleError as e:
                raise e.located(
                    source=spec.path, index=index, line=source.line(index), sample_id=source.raw_id(index)
                ) from None
            if limit is not None and len(items) >= limit:
                return items
    if not items:
        raise ValueError(f"{path}: no samples to evaluate")
    return items


def _item(source, index: int, root: str, max_image_pixels: int) -> EvalItem:
    sample = source.sample(index)
    answer_at = next(
        (i for i in reversed(range(len(sample.messages))) if sample.messages[i]["role"] == "assistant"), None
    )
    if answer_at is None or answer_at == 0:
        raise BadSampleError(
            "no_question_answer", "needs a question turn followed by an assistant (reference) turn"
        )
    prompt = sample.messages[:answer_at]
    n_images = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in prompt)
    if n_images > len(sample.images):
        raise BadSampleError(
            "image_count_mismatch",
            f"{n_images} placeholder(s) in the question but {len(sample.images)} image(s)",
        )
    record = (
        source.records[index] if hasattr(source, "records") else {}
    )  # the raw record holds the optional type
    kind = next((record[f] for f in TYPE_FIELDS if record.get(f) is not None), None)
    return EvalItem(
        id=sample.id,
        messages=prompt,
        images=list(sample.images[:n_images]),
        image_root=root,
        reference=sample.messages[answer_at]["content"].strip(),
        type=None if kind is None else str(kind),
        max_image_pixels=max_image_pixels,
    )


def swap_images(items: list[EvalItem], seed: int = 0) -> list[EvalItem]:
    """Give every item with images another item's images: a seeded derangement over the distinct image sets.

    Questions often share an image, so items are grouped by their image set; the sets (of equal image
    count) are put in a seeded random order and each is replaced by the next one in that cycle. No item
    can get its own image(s) back. Items without images are left as they are.
    """
    rng = random.Random(seed)
    groups: dict[int, list[tuple[str, ...]]] = {}
    for it in items:
        if it.images:
            key = tuple((it.image_root, ref) for ref in it.images)
            keys = groups.setdefault(len(it.images), [])
            if key not in keys:
                keys.append(key)
    mapping: dict[tuple, tuple] = {}
    for count, keys in sorted(groups.items()):
        if len(keys) < 2:
            raise ValueError(
                f"--swap-images needs at least two different image sets among samples with {count} image(s); found {len(keys)}"
            )
        order = keys[:]
        rng.shuffle(order)
        mapping.update({a: b for a, b in zip(order, order[1:] + order[:1], strict=True)})
    out = []
    for it in items:
        if not it.images:
            out.append(it)
            continue
        new = mapping[tuple((it.image_root, ref) for ref in it.images)]
        out.append(
            replace(it, images=[ref for _, ref in new], image_root=new[0][0], own_images=it.image_paths())
        )
    return out
