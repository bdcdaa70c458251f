"""What AnyRes costs in training throughput on the bench work, against square, and what packing recovers.

Each arm is `mllm train --stage 1` (connector only, the bench work's tiny CLIP and Llama, no checkpoints) for the
same steps and micro-batch; the arms differ only in `--image-aspect` and `--packing`. One invocation alternates
the arms for `--rounds` rounds (the machine is noisy) and prints, per arm, the visual tokens per image, the
median samples/s and tokens/s over the rounds (steps after the first two), and the ratio to square.

    python shared/bench/make_work.py WORK
    python scripts/anyres_cost.py WORK OUT --steps 20 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = {
    "square": ["--image-aspect", "square", "--packing", "off"],
    "anyres": ["--image-aspect", "anyres", "--max-tiles", "4", "--packing", "off"],
    "anyres+packing": ["--image-aspect", "anyres", "--max-tiles", "4", "--packing", "on"],
}
"""The arms' only differences. The bench work's 256×256 photos take a 2×2 grid of 224-px tiles under AnyRes
(it keeps their full resolution), plus the thumbnail."""


def train(work: Path, out: Path, arm: str, steps: int, batch: int) -> dict:
    """One `mllm train` run of `arm`; returns its per-step metrics after the first two steps."""
    from mllm.train.progress import read_metrics

    cmd = [sys.executable, "-m", "mllm", "train", "--stage", "1", "--vision", str(work / "vision")]
    cmd += [
        "--llm",
        str(work / "llm"),
        "--data",
        str(work / "pretrain.json"),
        "--image-root",
        str(work / "images"),
    ]
    cmd += ["--output", str(out)]
    cmd += [
        "--max-steps",
        str(steps),
        "--micro-batch-size",
        str(batch),
        "--grad-accum",
        "1",
        "--dtype",
        "fp32",
    ]
    cmd += ["--save-every", "0", "--resume", "no", *ARMS[arm]]
    print("$", " ".join(cmd), flush=True)
    with open(out.with_suffix(".log"), "w") as log:
        if subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT):
            sys.exit(f"{arm} failed; see {out.with_suffix('.log')}")
    return read_metrics(out)[2:]


def visual_tokens(work: Path, arm: str) -> int:
    """Visual tokens of one bench-work image under `arm`'s layout, from its size as training counts them."""
    from PIL import Image

    from mllm.config import VisionConfig
    from mllm.data.layout import layout_for

    config = json.loads((work / "vision" / "config.json").read_text())
    tile, patch = config["image_size"], config["patch_size"]
    flags = dict(zip(ARMS[arm][::2], ARMS[arm][1::2], strict=True))  # the arm's own settings, not a copy
    aspect, tiles = flags["--image-aspect"], int(flags.get("--max-tiles", 4))
    layout = layout_for(VisionConfig(image_aspect=aspect, max_tiles=tiles), tile, (tile // patch) ** 2)
    image = next(iter(sorted((work / "images").iterdir())))
    return layout.num_tokens(layout.fit(*Image.open(image).size))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("work", help="folder built by shared/bench/make_work.py")
    p.add_argument("output")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    work, out = Path(args.work), Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[list[dict]]] = {arm: [] for arm in ARMS}
    start = time.monotonic()
    for r in range(args.rounds):
        for arm in ARMS if r % 2 == 0 else reversed(ARMS):  # the order alternates between rounds
            runs[arm].append(train(work, out / f"{arm}-{r}", arm, args.steps, args.batch))
    rows = {}
    for arm, rounds in runs.items():
        rows[arm] = {
            "visual_tokens": visual_tokens(work, arm),
            "samples_per_s": statistics.median(
                statistics.median(m["samples_per_s"] for m in ms) for ms in rounds
            ),
            "tokens_per_s": statistics.median(
                statistics.median(m["tokens_per_s"] for m in ms) for ms in rounds
            ),
        }
    base = rows["square"]["samples_per_s"]
    print(
        f"\nbench work {work} · stage 1 · micro-batch {args.batch} · {args.steps} steps × {args.rounds} rounds"
    )
    print("| arm | visual tokens / image | samples/s | tokens/s | samples/s vs square |")
    print("|---|---|---|---|---|")
    for arm, row in rows.items():
        print(
            f"| {arm} | {row['visual_tokens']} | {row['samples_per_s']:.2f} | {row['tokens_per_s']:.0f} "
            f"| {row['samples_per_s'] / base:.2f}× |"
        )
    print(f"({(time.monotonic() - start) / 60:.1f} min)")
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
