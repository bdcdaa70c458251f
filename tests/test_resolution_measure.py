"""scripts/resolution_measure.py: a finished arm is neither retrained nor re-scored (the test split read once after
validation costs only its own evaluation)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "resolution_measure", ROOT / "scripts" / "resolution_measure.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_trained_arm_is_reused_and_a_scored_split_is_not_scored_again(tmp_path, monkeypatch):
    script = _script()
    calls = []
    monkeypatch.setattr(script, "run", lambda cmd, log: calls.append(cmd) or 0.0)
    args = SimpleNamespace(llm="/llm", pool=3, steps=5, batch=2, lr=1e-3, seed=0)
    script.train("square", args, tmp_path / "data", tmp_path)
    assert len(calls) == 1 and (tmp_path / "square.train.done").read_text() == " ".join(calls[0])
    script.train("square", args, tmp_path / "data", tmp_path)  # same command: not trained again
    assert len(calls) == 1
    script.train("square", SimpleNamespace(**{**vars(args), "steps": 6}), tmp_path / "data", tmp_path)
    assert len(calls) == 2  # another budget is another run

    (tmp_path / "square.val").mkdir()
    (tmp_path / "square.val" / "scores.json").write_text(json.dumps({"n": 3}))
    done = tmp_path / "square.train.done"
    os.utime(done, (1, 1))  # trained before it was scored
    assert script.evaluate("square", "val", tmp_path / "data", tmp_path) == {"n": 3} and len(calls) == 2
    os.utime(done, None)  # retrained since: scored again
    script.evaluate("square", "val", tmp_path / "data", tmp_path)
    assert len(calls) == 3
