"""Square vs AnyRes on the resolution task (docs/images.md), with the demo backbones and one training budget.

A flat recipe, each step the command a user would type:
1. build the task (`python -m mllm.demo.resolution`) unless it is there;
2. per arm (`square`, `anyres`): `mllm train --stage 1` (connector only, SmolLM2 frozen, chat template) with the
   same steps, batch, learning rate and seed; the arms differ only in `--image-aspect` (and its pinpoints);
3. `mllm eval` on the validation split (for choosing settings) and, with `--test`, once on the held-out test split
   (an arm already trained with the same command is not trained again, nor scored again on a split it was scored
   on, so `--test` after a validation run only evaluates the test split);
4. a Markdown table: accuracy per question type with n and a 95% Wilson interval, visual tokens per image,
   mean step time.

    python scripts/resolution_measure.py OUT --steps 150 [--test]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ARMS = {
    "square": ["--image-aspect", "square"],
    "anyres": ["--image-aspect", "anyres", "--grid-pinpoints", "448x896,896x448,448x448,224x896,896x224"],
}
"""The two arms' only difference. The anyres pinpoints (HEIGHTxWIDTH) include 448x896: an 896×448 canvas is then
cut into 2×4 full-resolution 224-px tiles (plus the thumbnail)."""


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion, in percent."""
    if n == 0:
        return 0.0, 100.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * (centre - half), 100 * (centre + half)


def run(cmd: list[str], log: Path) -> float:
    """Run `cmd` with its output in `log`; returns its wall time in seconds (stops the recipe on failure)."""
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"failed ({code}); see {log}")
    return time.perf_counter() - start


def train(arm: str, args, data: Path, out: Path) -> None:
    from mllm.demo.pipeline import default_backbones_dir
    from mllm.vision.efficientnet import default_weights_path

    llm = args.llm or str(Path(default_backbones_dir()) / "smollm2-135m-instruct")
    cmd = [sys.executable, "-m", "mllm", "train", "--stage", "1", "--vision", default_weights_path()]
    cmd += ["--vision-kind", "efficientnet-lite0", "--vision-pool", str(args.pool), *ARMS[arm]]
    cmd += ["--llm", llm, "--data", str(data / "resolution_train.yaml"), "--template", "chatml"]
    cmd += ["--output", str(out / arm), "--max-steps", str(args.steps), "--micro-batch-size", str(args.batch)]
    cmd += ["--grad-accum", "1", "--lr", str(args.lr), "--warmup-ratio", "0.03", "--seed", str(args.seed)]
    cmd += ["--save-every", "0", "--resume", "no", "--num-workers", "1"]
    done = out / f"{arm}.train.done"
    if done.is_file() and done.read_text() == " ".join(cmd):
        print(f"{arm}: trained already with these settings ({done})", flush=True)
        return
    run(cmd, out / f"{arm}.train.log")
    done.write_text(" ".join(cmd))


def evaluate(arm: str, split: str, data: Path, out: Path) -> dict:
    scores, done = out / f"{arm}.{split}" / "scores.json", out / f"{arm}.train.done"
    if scores.is_file() and done.is_file() and scores.stat().st_mtime > done.stat().st_mtime:
        return json.loads(scores.read_text())  # this checkpoint was scored on this split already
    cmd = [
        sys.executable,
        "-m",
        "mllm",
        "eval",
        str(out / arm),
        "--data",
        str(data / f"resolution_{split}.yaml"),
    ]
    cmd += ["--output", str(out / f"{arm}.{split}"), "--max-new-tokens", "4", "--batch-size", "16"]
    run(cmd, out / f"{arm}.{split}.log")
    return json.loads((out / f"{arm}.{split}" / "scores.json").read_text())


def step_seconds(run_dir: Path, batch: int) -> float:
    """Median wall time per optimizer step after the first (which pays for warm-up), from the run's metrics."""
    from mllm.train.progress import read_metrics

    times = sorted(batch / r["samples_per_s"] for r in read_metrics(run_dir)[1:] if r["samples_per_s"])
    return times[len(times) // 2] if times else float("nan")


def visual_tokens(run_dir: Path, size: tuple[int, int]) -> int:
    """Visual tokens of one canvas of `size` (width, height) under the run's saved image layout."""
    from mllm.inference import load_pretrained

    model, _ = load_pretrained(str(run_dir))
    return model.image_layout.num_tokens(model.image_layout.fit(*size))


def table(results: dict, split: str) -> str:
    lines = [
        f"| arm | shape acc. ({split}) | colour acc. ({split}) | visual tokens / image | s / step |",
        "|---|---|---|---|---|",
    ]
    for arm, r in results.items():
        cells = []
        for kind in ("shape", "color"):
            s = r[split]["per_type"][kind]
            n, acc = s["n"], s["exact_match"]
            lo, hi = wilson(round(acc * n / 100), n)
            cells.append(f"{acc:.1f}% [{lo:.1f}, {hi:.1f}] (n={n})")
        lines.append(f"| {arm} | {cells[0]} | {cells[1]} | {r['tokens']} | {r['step_s']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("output")
    p.add_argument("--data", default="", help="a built task folder (default OUTPUT/data, built when missing)")
    p.add_argument("--llm", default="", help="SmolLM2 folder (default: the demo's cached copy)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--pool", type=int, default=3, help="EfficientNet grid pooling: 3 → 9 tokens per tile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--test", action="store_true", help="also evaluate the held-out test split (do this once)")
    args = p.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data"
    if not (data / "train.json").is_file():
        run([sys.executable, "-m", "mllm.demo.resolution", str(data)], out / "data.log")
    canvas = tuple(json.loads((data / "manifest.json").read_text())["settings"]["canvas"])
    results = {}
    for arm in args.arms:
        train(arm, args, data, out)
        results[arm] = {"val": evaluate(arm, "val", data, out), "step_s": step_seconds(out / arm, args.batch)}
        results[arm]["tokens"] = visual_tokens(out / arm, canvas)
        if args.test:
            results[arm]["test"] = evaluate(arm, "test", data, out)
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=1))
    for split in ("val", "test") if args.test else ("val",):
        print(table(results, split))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
