"""Stage 0, BLIP-2 Q-Former representation pretraining: the three losses, ITC negatives across processes, the
`mllm train --stage 0` run and its checkpoint feeding stage 1, and `mllm eval --task retrieval`."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllm.config import ConnectorConfig, ModelConfig, VisionConfig
from mllm.eval.retrieval import recall_at
from mllm.model.qformer_pretrain import (
    build_qformer_pretrainer,
    caption_keys,
    caption_tokenizer,
    hard_negatives,
)
from mllm.train.config import resolve_config

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a red square",
    "a blue circle",
    "a red circle",
]


def _pretrainer(backbones, tiny_bert, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vision=VisionConfig(path=backbones["clip"]),
        connector=ConnectorConfig(kind="qformer", num_queries=4, qformer_text=True, qformer_init=tiny_bert),
        dtype="fp32",
    )
    return build_qformer_pretrainer(cfg)


def _batch(model, seed: int = 0):
    """Six captions (two the same text) as the training collator gives them, and tower-like features."""
    tok = caption_tokenizer(model.connector)
    ids = tok(CAPTIONS, padding=True, return_tensors="pt")["input_ids"]  # [6, T] "[CLS] … [SEP]" + [PAD]
    g = torch.Generator().manual_seed(seed)
    width = model.connector.qformer.config.encoder_hidden_size
    colour = {"red": 0, "blue": 1, "green": 2}
    features = torch.randn(len(CAPTIONS), 5, width, generator=g) * 0.1
    for i, text in enumerate(CAPTIONS):  # images carry their caption's words, so there is something to learn
        features[i, :, colour[text.split()[1]]] += 3.0
        features[i, :, 3 + ["circle", "square", "triangle"].index(text.split()[2])] += 3.0
    return dict(input_ids=ids, features=features, image_counts=torch.ones(len(CAPTIONS), dtype=torch.long))


def test_the_three_losses_are_finite_and_fall(backbones, tiny_bert):
    model = _pretrainer(backbones, tiny_bert)
    batch = _batch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(12):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append({k: float(v.detach()) / len(CAPTIONS) for k, v in out.parts.items()})
    assert all(math.isfinite(v) for h in history for v in h.values())
    assert float(out.loss) == pytest.approx(
        sum(float(v) for v in out.parts.values()) / len(CAPTIONS), rel=1e-5
    )
    for name in ("itc", "itm", "itg"):
        assert history[-1][name] < history[0][name], (name, history[0][name], history[-1][name])


def test_same_caption_is_a_positive_and_never_a_hard_negative(backbones, tiny_bert):
    model = _pretrainer(backbones, tiny_bert)
    ids = _batch(model)["input_ids"]
    keys = caption_keys(ids, (ids != model.pad_id).long())
    same = keys[:, None] == keys[None]
    assert same[0, 5] and same.sum() == len(CAPTIONS) + 2  # rows 0 and 5 are both "a red circle"
    sim = torch.zeros(6, 6)
    sim[0, 5] = 50.0  # the most similar column is the same caption: never drawn
    for _ in range(20):
        picked = hard_negatives(sim, same)
        assert picked[0] not in (0, 5) and all(not same[i, j] for i, j in enumerate(picked.tolist()))
    assert (hard_negatives(sim, torch.ones(6, 6, dtype=torch.bool)) == -1).all()  # none left: none drawn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GATHER_CHILD = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_qformer_pretrain import _pretrainer, _batch
from mllm.train.distributed import all_gather_rows
rank = int(sys.argv[1])
torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
model = _pretrainer({backbones!r}, {bert!r}).eval()  # no dropout: the same numbers as the one process
model.gather_rows = all_gather_rows
batch = _batch(model)
half = slice(0, 3) if rank == 0 else slice(3, 6)
out = model(input_ids=batch["input_ids"][half], features=batch["features"][half], image_counts=batch["image_counts"][half])
(out.parts["itc"] / 6).backward()  # this process's part of the whole batch's mean
grad = model.heads.vision_proj.weight.grad.clone()
torch.distributed.all_reduce(grad)
print(json.dumps({{"itc": float(out.parts["itc"]) / 3, "grad": grad.flatten()[:8].tolist()}}))
"""


@pytest.mark.slow
def test_itc_gathers_negatives_across_two_processes(backbones, tiny_bert):
    """Two processes with three captions each compute the ITC loss (and gradient) of all six on one process."""
    code = GATHER_CHILD.format(
        tests=str(ROOT / "tests"), port=_free_port(), backbones=dict(backbones), bert=tiny_bert
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        for r in range(2)
    ]
    results = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    model = _pretrainer(backbones, tiny_bert).eval()
    out = model(**_batch(model))
    (out.parts["itc"] / 6).backward()
    whole = model.heads.vision_proj.weight.grad.flatten()[:8]
    assert (results[0]["itc"] + results[1]["itc"]) / 2 == pytest.approx(float(out.parts["itc"]) / 6, rel=1e-4)
    # each process back-propagates through its own rows only; summed over processes: the whole batch's gradient
    torch.testing.assert_close(torch.tensor(results[0]["grad"]), whole, rtol=1e-3, atol=1e-6)


def test_recall_counts_any_image_of_a_caption():
    sim = torch.tensor(
        [[0.9, 0.1, 0.0], [0.2, 0.1, 0.8], [0.1, 0.7, 0.3], [0.6, 0.5, 0.4]]
    )  # [4 images, 3 texts]
    truth = torch.tensor([0, 1, 1, 2])
    assert recall_at(sim, truth, 1) == (pytest.approx(100 * 2 / 4), pytest.approx(100 * 2 / 3))
    # at 2: images 1 and 3 still miss; caption 2 finds image 3 second (0.4, after image 1's 0.8)
    assert recall_at(sim, truth, 2) == (pytest.approx(50.0), pytest.approx(100.0))


def test_stage_0_is_a_stage_of_its_own():
    cfg = resolve_config(stage=0, connector="qformer", qformer_text=True)
    assert cfg.stage == 0 and cfg.packing == "off" and cfg.llm_mode == "frozen"
    with pytest.raises(ValueError, match="text-aware Q-Former"):
        resolve_config(stage=0, connector="mlp")
    with pytest.raises(ValueError, match="starts from a BERT"):
        resolve_config(stage=0, connector="qformer", qformer_text=True, init_from="x")


pytestmark = pytest.mark.usefixtures("one_process_group")


def _captions(folder: Path) -> str:
    from PIL import Image

    (folder / "img").mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}
    records = []
    for i, (name, rgb) in enumerate(colours.items()):
        Image.new("RGB", (32, 32), rgb).save(folder / "img" / f"{name}.png")
        conv = [
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": f"A {name} image."},
        ]
        records.append({"id": f"c{i}", "image": f"img/{name}.png", "conversations": conv})
    (folder / "captions.json").write_text(json.dumps(records))
    return str(folder / "captions.json")


@pytest.mark.slow
def test_stage_0_run_logs_its_losses_and_starts_stage_1(backbones, tiny_bert, tmp_path):
    from mllm.checkpoint import read_weights
    from mllm.eval.data import load_eval_items
    from mllm.eval.retrieval import retrieval_scores
    from mllm.model.qformer_pretrain import HEADS_FILE, load_qformer_pretrainer
    from mllm.train.loop import setup, train
    from mllm.train.progress import read_metrics

    data = _captions(tmp_path)
    common = dict(vision=backbones["clip"], data=data, dtype="fp32", connector="qformer", num_queries=4)
    common |= dict(template="plain", micro_batch_size=4, grad_accum=1, num_workers=0, save_every=0, seed=1)
    cfg = resolve_config(
        stage=0, output=str(tmp_path / "s0"), qformer_text=True, qformer_init=tiny_bert, max_steps=3, lr=1e-3,
        **common,
    )  # fmt: skip
    summary = train(cfg)
    records = read_metrics(tmp_path / "s0")
    assert len(records) == 3
    for r in records:
        parts = [r["loss_itc"], r["loss_itm"], r["loss_itg"]]
        assert all(math.isfinite(v) and v > 0 for v in parts)
        assert sum(parts) == pytest.approx(r["loss"], rel=1e-4)
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / HEADS_FILE).is_file() and (ckpt / "qformer_tokenizer").is_dir()

    model, _ = load_qformer_pretrainer(str(tmp_path / "s0"))
    scores = retrieval_scores(model, load_eval_items(data), batch_size=3, progress=False)
    assert (
        scores["n_texts"] == 4
        and 0 <= scores["zero_shot_accuracy"] <= 100
        and scores["itm_accuracy"] is not None
    )

    stage1 = resolve_config(
        stage=1, output=str(tmp_path / "s1"), llm=backbones["llama"], init_from=str(tmp_path / "s0"), max_steps=1,
        **common,
    )  # fmt: skip
    session = setup(stage1)
    saved = read_weights(ckpt / "connector.safetensors")
    loaded = session.model.connector.state_dict()
    assert saved and all(torch.equal(loaded[k], v) for k, v in saved.items())
    assert "proj.weight" in loaded and "proj.weight" not in saved  # the LLM projection is stage 1's own
    session.stream.close()
