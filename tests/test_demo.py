"""`mllm demo`: the reduced (--quick) demo end to end on the real backbones: files, results schema, a real blind swap."""

from __future__ import annotations

import json
import shlex

import pytest

from mllm.demo import demo_settings, format_report, train_command
from mllm.demo.pipeline import chat_command

TYPES = ("yes/no", "color", "shape")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory, request):
    """Run `mllm demo --quick` once (real EfficientNet-Lite0 + SmolLM2, a few steps); the fetched LLM is cached
    in pytest's cache folder so that reruns skip the GGUF conversion."""
    from mllm.cli import main

    out = tmp_path_factory.mktemp("demo") / "run"
    cache = getattr(request.config, "cache", None)  # None under `-p no:cacheprovider`
    backbones = cache.mkdir("mllm-backbones") if cache else tmp_path_factory.mktemp("backbones")
    assert main(["demo", "--quick", "--output", str(out), "--backbones", str(backbones), "--quiet"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.demo
def test_quick_demo_writes_every_phase_and_the_results_schema(quick_demo, capsys):
    out = quick_demo
    results = json.loads((out / "results.json").read_text())
    s2 = results["stage2"]
    assert set(s2) >= {"accuracy", "blind_accuracy", "by_type", "n"} and s2["n"] >= 24
    assert set(s2["by_type"]) == set(TYPES)
    assert sum(v["n"] for v in s2["by_type"].values()) == s2["n"]
    for v in [s2, *s2["by_type"].values()]:
        assert 0 <= v["accuracy"] <= 100 and 0 <= v["blind_accuracy"] <= 100
    assert (
        set(results["stage1"]) >= {"caption_accuracy", "n", "final_loss"} and results["stage1"]["steps"] == 2
    )
    assert results["seconds"] > 0 and set(results["phases"]) == {
        "fetch",
        "data",
        "stage1",
        "eval_stage1",
        "stage2",
        "eval",
        "eval_blind",
    }
    assert results["settings"]["schedule"] == "quick" and results["settings"]["connector"] == "mlp"
    for path in (
        "data/manifest.json",
        "stage1/summary.json",
        "stage2/summary.json",
        "eval/scores.json",
        "logs/stage2.log",
    ):
        assert (out / path).is_file(), path
    assert list((out / "stage2").glob("checkpoint-*/COMPLETE"))
    run = (out / "logs" / "stage2.log").read_text().splitlines()[0]
    assert (
        " -m mllm train --stage 2 " in run and "--llm-mode lora" in run
    )  # the user's command, not a shortcut


@pytest.mark.slow
@pytest.mark.demo
def test_blind_baseline_really_shows_other_images(quick_demo):
    seen = [json.loads(line) for line in (quick_demo / "eval" / "predictions.jsonl").read_text().splitlines()]
    blind = [
        json.loads(line)
        for line in (quick_demo / "eval_blind" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [r["id"] for r in seen] == [r["id"] for r in blind]
    assert all(b["own_images"] == s["images"] for s, b in zip(seen, blind, strict=True))
    assert all(b["images"] != s["images"] for s, b in zip(seen, blind, strict=True))
    assert len({tuple(b["images"]) for b in blind}) > 1


@pytest.mark.slow
@pytest.mark.demo
def test_printed_chat_command_answers(quick_demo, capsys, monkeypatch):
    from mllm.cli import main

    results = json.loads((quick_demo / "results.json").read_text())
    monkeypatch.chdir(quick_demo.parent)
    argv = shlex.split(results["chat_command"])
    assert argv[:2] == ["mllm", "chat"]
    capsys.readouterr()
    assert main(argv[1:] + ["--prompt", "what color is the shape?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("connector", ["mlp", "qformer", "resampler"])
@pytest.mark.parametrize("schedule", ["quick", "default", "full"])
def test_stage_commands_parse_as_the_training_config_they_mean(tmp_path, schedule, connector):
    import argparse

    from mllm.train.config import add_config_arguments, resolve_config

    settings = demo_settings(schedule, connector)
    configs = []
    for stage in (1, 2):
        cmd = train_command(stage, settings, "/llm", tmp_path / "data", tmp_path)
        assert cmd[1:5] == ["-m", "mllm", "train", "--stage"]
        parser = argparse.ArgumentParser()
        add_config_arguments(parser)
        configs.append(resolve_config(parser.parse_args(cmd[4:])))
    one, two = configs
    assert (
        one.stage == 1
        and one.llm_mode == "frozen"
        and one.connector == connector
        and one.vision_kind == "efficientnet-lite0"
    )
    assert one.vision_pool == (3 if connector == "mlp" else 1) and one.max_steps == settings.stage1.steps
    assert (one.connector_width, one.connector_layers) == (
        settings.connector_width,
        settings.connector_layers,
    )
    assert two.lora_target_modules == settings.lora_target_modules
    assert two.stage == 2 and two.llm_mode == "lora" and two.init_from == str(tmp_path / "stage1")
    assert (two.lora_r, two.lora_alpha, two.lr) == (settings.lora_r, settings.lora_alpha, settings.stage2.lr)
    assert (
        two.max_steps == settings.stage2.steps
        and two.data.endswith("demo_stage2.yaml")
        and two.resume == "no"
    )


def test_report_shows_accuracy_blind_gap_times_and_the_chat_command(tmp_path):
    by_type = {"yes/no": (736, 90.0, 80.0), "color": (139, 97.0, 12.0), "shape": (131, 99.0, 33.0)}
    results = {
        "stage1": {"caption_accuracy": 91.0, "n": 92},
        "stage2": {
            "accuracy": 92.0,
            "blind_accuracy": 66.0,
            "n": 1006,
            "by_type": {k: {"n": n, "accuracy": a, "blind_accuracy": b} for k, (n, a, b) in by_type.items()},
        },
        "seconds": 900.0,
        "phases": {"fetch": 20.0, "stage2": 500.0},
        "visual_tokens": 9,
        "settings": demo_settings("default").to_dict(),
        "chat_command": chat_command(tmp_path / "stage2", tmp_path / "x.png"),
    }
    text = format_report(results)
    assert "overall      1006     92.0%     66.0%  +26.0" in text
    assert "color         139     97.0%     12.0%  +85.0" in text
    assert (
        "stage2 500s" in text and "total 15.0 min" in text and f"mllm chat {tmp_path}/stage2 --image" in text
    )


def test_unknown_schedule_or_connector_is_refused():
    with pytest.raises(ValueError, match="quick|default|full"):
        demo_settings("huge")
    with pytest.raises(ValueError, match="connector"):
        demo_settings("quick", "linear")


def test_a_phase_ends_with_its_command_even_if_a_grandchild_holds_the_output(tmp_path):
    """A stray grandchild keeping the log pipe open must neither stall the demo nor outlive the phase; the log
    gets the output as it comes, progress-bar redraws (\\r) included."""
    import os
    import sys
    import time

    from mllm.demo.pipeline import Demo

    demo = Demo(str(tmp_path), demo_settings("quick"), stream=False)
    tmp_path.mkdir(exist_ok=True)
    pidfile = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys; "
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pidfile)!r}, 'w').write(str(p.pid)); "
        "print('step 1\\rstep 2', flush=True)"
    )
    start = time.monotonic()
    demo.execute("phase", [sys.executable, "-c", script])
    assert time.monotonic() - start < 60
    assert b"step 1\rstep 2" in (tmp_path / "logs" / "phase.log").read_bytes()
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{grandchild}"):
        state = (
            open(f"/proc/{grandchild}/stat").read().split()[2]
            if os.path.exists(f"/proc/{grandchild}")
            else ""
        )
        if state == "Z":
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{grandchild}") or state == "Z"


def test_qformer_pretrain_route_runs_stage_0_then_stage_1_from_it(tmp_path):
    """`mllm demo --connector qformer --qformer-pretrain`: stage 0 pretrains a MiniLM Q-Former on the stage-1
    captions without an LLM; stage 1 starts from it."""
    import argparse

    from mllm.train.config import add_config_arguments, resolve_config

    settings = demo_settings("default", "qformer", qformer_pretrain=True)
    parsed = []
    for stage in (0, 1):
        cmd = train_command(stage, settings, "/llm", tmp_path / "data", tmp_path, qformer_init="/minilm")
        parser = argparse.ArgumentParser()
        add_config_arguments(parser)
        parsed.append(resolve_config(parser.parse_args(cmd[4:])))
    zero, one = parsed
    assert zero.stage == 0 and not zero.llm and zero.qformer_text and zero.qformer_init == "/minilm"
    assert zero.data.endswith("demo_stage1.yaml") and zero.max_steps == settings.stage0.steps
    assert one.stage == 1 and one.init_from == str(tmp_path / "stage0") and one.llm == "/llm"
    with pytest.raises(ValueError, match="--connector qformer"):
        demo_settings("default", "mlp", qformer_pretrain=True)
