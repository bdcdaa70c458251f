"""webdataset shards end to end, on tiny real backbones: both training stages, the exact resume, `mllm eval` and
`mllm data check`, each against the same samples written as JSON; and a 2-process run that resumes exactly."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from mllm.cli import main


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, kind: str) -> tuple[str, str]:
    """The 8 colour samples of test_train_runs as 2 tar shards of 4 and as JSON with the same images.

    `kind` `caption`: `.png` + `.txt` shards beside a captions JSONL (stage 1); `conversation`: `.png` + `.json`
    shards beside a LLaVA JSON (stage 2 and eval). Returns (shard pattern, JSON file).
    """
    from test_train_runs import write_colours

    records = json.loads(Path(write_colours(folder)).read_text())
    rows = []
    for s in range(2):
        with tarfile.open(folder / f"{kind}-{s:04d}.tar", "w") as tar:
            for rec in records[4 * s : 4 * s + 4]:
                png = (folder / rec["image"]).read_bytes()
                add_member(tar, f"{rec['id']}.png", png)
                answer = rec["conversations"][1]["value"]
                if kind == "caption":
                    add_member(tar, f"{rec['id']}.txt", answer.encode())
                    rows.append({"id": rec["id"], "image": rec["image"], "caption": answer})
                else:
                    add_member(
                        tar, f"{rec['id']}.json", json.dumps({"conversations": rec["conversations"]}).encode()
                    )
                    rows.append(rec)
    data = folder / ("captions.jsonl" if kind == "caption" else "conversations.json")
    data.write_text("\n".join(json.dumps(r) for r in rows) if kind == "caption" else json.dumps(rows))
    return str(folder / f"{kind}-{{0000..0001}}.tar"), str(data)


@pytest.mark.parametrize("kind,template", [("caption", "plain"), ("conversation", "llama3")])
def test_shards_give_the_items_of_the_same_samples_as_json(backbones, tmp_path, kind, template):
    """Token ids, labels, pixels and exact lengths, item by item: a run on the shards trains on what a run on the
    JSON does, in the same order (the sampler sees the same lengths)."""
    from test_data_formats import preprocess
    from transformers import AutoTokenizer

    from mllm.data import build_dataset, load_recipe

    shards, as_json = write_shards(tmp_path, kind)
    tok = AutoTokenizer.from_pretrained(backbones["llama"])
    a, b = (
        build_dataset(
            load_recipe(data, template=template, cache_dir="none"), tok, 4, preprocess, progress=False
        )
        for data in (shards, as_json)
    )
    assert len(a) == len(b) == 8 and a.lengths == b.lengths and a.has_image == b.has_image
    for i in range(8):
        x, y = a[i], b[i]
        assert all(torch.equal(x[k], y[k]) for k in ("input_ids", "labels", "pixel_values")), i


@pytest.mark.slow
@pytest.mark.usefixtures("one_process_group")
def test_shards_train_both_stages_resume_at_the_exact_sample_and_evaluate(backbones, tmp_path, capsys):
    from test_train_runs import config, losses

    from mllm.train.loop import train

    shards, _ = write_shards(tmp_path / "stage1", "caption")
    check = [
        "data",
        "check",
        shards,
        "--tokenizer",
        backbones["llama"],
        "--template",
        "plain",
        "--no-progress",
    ]
    assert main([*check, "--bad-samples", str(tmp_path / "bad.jsonl")]) == 0
    report = capsys.readouterr().out
    assert "8 samples, 0 bad" in report and "webdataset" in report, report

    # stage 1 on the shards, read by 2 DataLoader workers
    kw = dict(max_steps=6, save_every=3, keep_last=0, num_workers=2, schedule="cosine")
    train(config(backbones, shards, tmp_path / "full", **kw))
    straight = losses(tmp_path / "full")
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]

    # stopped after step 3 (an epoch is 2 steps: the resume is mid-epoch 2), continued: the same samples follow
    (tmp_path / "stopped").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "stopped" / "checkpoint-3")
    assert (
        train(config(backbones, shards, tmp_path / "stopped", **{**kw, "num_workers": 0}))["steps_this_run"]
        == 3
    )
    resumed = losses(tmp_path / "stopped")
    assert sorted(resumed) == [4, 5, 6] and all(resumed[s] == straight[s] for s in resumed), (
        resumed,
        straight,
    )

    # stage 2 (LoRA) from the stage-1 connector on conversation shards, then `mllm eval` on shards and on JSON
    conversations, as_json = write_shards(tmp_path / "stage2", "conversation")
    stage2 = config(
        backbones, conversations, tmp_path / "stage2-run", stage=2, init_from=str(tmp_path / "full"),
        max_steps=2, lora_r=4, lr=3e-3,
    )  # fmt: skip
    assert train(stage2)["steps_this_run"] == 2
    scores = {}
    for name, data in (("shards", conversations), ("json", as_json)):
        out = tmp_path / f"eval-{name}"
        argv = ["eval", str(tmp_path / "stage2-run"), "--data", data, "--output", str(out)]
        assert main([*argv, "--max-new-tokens", "4", "--no-progress"]) == 0
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        scores[name] = (json.loads((out / "scores.json").read_text())["exact_match"], rows)
    (shard_score, shard_rows), (json_score, json_rows) = scores["shards"], scores["json"]
    assert len(shard_rows) == 8 and shard_score == json_score
    assert [r["prediction"] for r in shard_rows] == [r["prediction"] for r in json_rows]
    assert all(r["images"][0].startswith("sha1:") for r in shard_rows)


@pytest.mark.slow
def test_two_processes_split_the_shards_exactly_and_resume_at_the_exact_sample(backbones, tmp_path):
    """Stage 1 on the shards, 2 ranks (global batch 2: one sample per rank and step), 6 steps with a checkpoint at
    step 3: the same per-step losses as 1 process (the ranks' halves make up the same global batches), and the
    2-rank run resumed from step 3 continues with exactly the losses of the run never stopped."""
    from test_train_cluster import ELASTIC_TOLERANCE, losses, pretrain, run_ranks

    shards, _ = write_shards(tmp_path / "data", "caption")
    steps = ["--num-workers", "0", "--max-steps", "6", "--save-every", "3", "--keep-last", "0"]
    runs = {name: tmp_path / name for name in ("one", "two", "two-resumed")}
    run_ranks(pretrain(backbones, shards, runs["one"], *steps), 1)
    run_ranks(pretrain(backbones, shards, runs["two"], *steps), 2)
    one, two = losses(runs["one"]), losses(runs["two"])
    assert sorted(two) == [1, 2, 3, 4, 5, 6]
    assert max(abs(one[s] - two[s]) for s in two) < ELASTIC_TOLERANCE, (one, two)

    runs["two-resumed"].mkdir()
    shutil.copytree(runs["two"] / "checkpoint-3", runs["two-resumed"] / "checkpoint-3")
    stderr = run_ranks(pretrain(backbones, shards, runs["two-resumed"], *steps), 2)
    assert "at step 3" in stderr, stderr[-3000:]
    resumed = losses(runs["two-resumed"])
    assert sorted(resumed) == [4, 5, 6] and all(resumed[s] == two[s] for s in resumed), (resumed, two)
