"""Samples as the model sees them: decoded tokens, image runs collapsed, supervised spans marked."""

from __future__ import annotations

from mllm.config import IGNORE_INDEX, IMAGE_TOKEN_ID
from mllm.data.dataset import recipe_tasks
from mllm.data.errors import BadSampleError
from mllm.data.reader import open_reader
from mllm.data.recipe import Recipe

OPEN, CLOSE = "[[", "]]"
GREEN, RESET = "\033[32m", "\033[0m"


def render_tokens(
    tokenizer, ids: list[int], labels: list[int], color: bool = False, image_tokens: list[int] | None = None
) -> str:
    """Text of `ids` with `<image×K>` per image and supervised runs wrapped in [[ ]] (or green).

    `image_tokens`: each image's count, so that adjacent images show apart; without it a run shows as one."""
    out, run, run_sup = [], [], None
    counts = list(image_tokens or [])

    def flush():
        if run:
            text = tokenizer.decode(run)
            out.append((GREEN + text + RESET if color else OPEN + text + CLOSE) if run_sup else text)
            run.clear()

    k = 0
    while k < len(ids):
        if ids[k] == IMAGE_TOKEN_ID:
            flush()
            n = 0
            while k < len(ids) and ids[k] == IMAGE_TOKEN_ID:
                n, k = n + 1, k + 1
            while counts and 0 < counts[0] < n:  # several images in a row
                out.append(f"<image×{counts[0]}>")
                n -= counts.pop(0)
            counts = counts[1:]
            out.append(f"<image×{n}>")
            continue
        sup = labels[k] != IGNORE_INDEX
        if sup != run_sup:
            flush()
            run_sup = sup
        run.append(ids[k])
        k += 1
    flush()
    return "".join(out)


def show_samples(
    recipe: Recipe,
    tokenizer,
    image_tokens,
    n: int = 3,
    start: int = 0,
    seed: int = 0,
    color: bool = False,
) -> str:
    """`n` samples from `start` as text; `image_tokens`: the model's `ImageLayout` or one count per image."""
    reader = open_reader(recipe, tokenizer, image_tokens)
    tasks = recipe_tasks(reader, seed)[start : start + n]
    blocks = []
    for si, idx in tasks:
        src = reader.sources[si]
        where = f"{src.name} " + (f"line {src.line(idx)}" if src.line(idx) is not None else f"index {idx}")
        try:
            sample, enc = reader.encode(si, idx)
        except BadSampleError as e:
            blocks.append(f"=== {where}: BAD {reader.locate(e, si, idx)}")
            continue
        supervised = sum(lab != IGNORE_INDEX for lab in enc.labels)
        head = (
            f"=== {where} id={sample.id!r}: {len(enc.input_ids)} tokens, {supervised} supervised, "
            f"{enc.num_images} image(s) of {enc.image_tokens} visual tokens"
            f"{f' (truncated from {enc.full_length})' if enc.truncated else ''}"
        )
        blocks.append(
            head + "\n" + render_tokens(tokenizer, enc.input_ids, enc.labels, color, enc.image_tokens)
        )
    legend = "supervised tokens in green" if color else f"supervised tokens inside {OPEN} {CLOSE}"
    return f"recipe {recipe.name} (template {recipe.template}); {legend}\n\n" + "\n\n".join(blocks)
