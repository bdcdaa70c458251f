"""Whole training runs on tiny real backbones (one process, in this process): stage 1 → stage 2 lora → qlora,
exact resume, a save killed half-way. The multi-process DeepSpeed launches are in test_train_deepspeed.py."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from mllm.checkpoint import latest_checkpoint, load_model_and_config, verify
from mllm.train.config import resolve_config
from mllm.train.loop import fit, setup, train
from mllm.train.progress import read_metrics

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}
COLOURS |= {"black": (0, 0, 0), "white": (255, 255, 255), "purple": (128, 0, 128), "orange": (255, 140, 0)}


def write_colours(folder: Path) -> str:
    """8 memorisable samples: a plain-coloured image and its colour's name."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (32, 32), rgb).save(folder / "img" / f"{name}.png")
        conversation = [
            {"from": "human", "value": "<image>\nWhat colour is this?"},
            {"from": "gpt", "value": f"It is {name}."},
        ]
        records.append({"id": f"c{i}", "image": f"img/{name}.png", "conversations": conversation})
    (folder / "colours.json").write_text(json.dumps(records))
    return str(folder / "colours.json")


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> str:
    return write_colours(tmp_path_factory.mktemp("colours"))


pytestmark = pytest.mark.usefixtures("one_process_group")


@pytest.fixture(scope="module")
def peaked_llm(backbones, tmp_path_factory) -> str:
    """The tiny llama with 10× embeddings. Its head is tied to them and its final norm is frozen, so at random
    init the logits are too flat (loss floor ~5.7) for a connector or adapter to memorise anything."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path_factory.mktemp("llm-peaked"))
    model = AutoModelForCausalLM.from_pretrained(backbones["llama"])
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(backbones["llama"]).save_pretrained(out)
    return out


def config(backbones, data, output, stage=1, **kw):
    base = dict(vision=backbones["clip"], llm=backbones["llama"], data=data, output=str(output), dtype="fp32")
    base |= dict(micro_batch_size=2, grad_accum=2, num_workers=0, save_every=0, warmup_ratio=0.0, seed=3)
    if stage == 1:
        base |= dict(template="plain", lr=1e-2)
    return resolve_config(stage=stage, **{**base, **kw})


def run_and_diff(cfg):
    """Train; return the summary and the names of the parameters whose values changed."""
    session = setup(cfg)
    before = {n: p.detach().clone() for n, p in session.model.named_parameters()}
    summary = fit(session)
    changed = {n for n, p in session.model.named_parameters() if not torch.equal(before[n], p.detach())}
    return summary, changed, set(before)


def losses(output) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(output))}


def falls(output, by: float) -> bool:
    """Mean loss of the last 4 steps is below the mean of the first 2 by `by` (robust to one noisy step)."""
    curve = [v for _, v in sorted(losses(output).items())]
    first, last = sum(curve[:2]) / 2, sum(curve[-4:]) / 4
    assert last < first - by, curve
    return True


@pytest.mark.slow
def test_stage1_then_lora_then_qlora(backbones, peaked_llm, colours, tmp_path):
    s1 = config(backbones, colours, tmp_path / "s1", llm=peaked_llm, max_steps=16, save_every=8, keep_last=1)
    summary, changed, names = run_and_diff(s1)
    assert changed == {n for n in names if n.startswith("connector.")}  # every connector weight, nothing else
    assert falls(tmp_path / "s1", by=1.0)
    assert [p.name for p in sorted((tmp_path / "s1").glob("checkpoint-*"))] == [
        "checkpoint-16"
    ]  # keep-last 1
    for f in ("metrics.jsonl", "run_config.yaml", "loss_lr.png", "summary.json"):
        assert (tmp_path / "s1" / f).is_file(), f
    assert any((tmp_path / "s1" / "tensorboard").iterdir())
    record = read_metrics(tmp_path / "s1")[0]
    assert set(record) >= {"step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s"}

    model, saved = load_model_and_config(tmp_path / "s1")  # no DeepSpeed involved from here on
    assert saved["template"] == "plain" and saved["max_length"] == 2048 and "system_prompt" in saved
    assert saved["run"]["stage"] == 1 and saved["run"]["llm"] == peaked_llm

    lora = dict(llm_mode="lora", max_steps=12, lora_r=8, lora_alpha=16, lr=3e-2, connector_lr=1e-3)
    s2 = config(
        backbones,
        colours,
        tmp_path / "s2",
        stage=2,
        init_from=str(tmp_path / "s1"),
        vision="",
        llm="",
        **lora,
    )
    summary, changed, names = run_and_diff(s2)
    assert changed and all(n.startswith("connector.") or ".lora_" in n for n in changed), sorted(changed)[:5]
    assert {n for n in names if ".lora_B." in n} <= changed  # the adapters did train
    assert falls(tmp_path / "s2", by=3.0)
    lora_model, saved = load_model_and_config(tmp_path / "s2")
    assert saved["run"]["llm_mode"] == "lora" and saved["run"]["vision"] == backbones["clip"]
    ckpt = latest_checkpoint(tmp_path / "s2")
    assert sorted(os.listdir(ckpt / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]

    s3 = dataclasses.replace(s2, output=str(tmp_path / "s3"), llm_mode="qlora")
    summary, changed, names = run_and_diff(s3)
    assert changed and all(n.startswith("connector.") or ".lora_" in n for n in changed), sorted(changed)[:5]
    assert falls(tmp_path / "s3", by=3.0)
    qlora_model, saved = load_model_and_config(tmp_path / "s3")
    assert saved["model"]["llm"]["mode"] == "qlora"


def test_token_budget_sets_the_micro_batches(backbones, colours, tmp_path):
    # a budget below every sample's length: each sample gets a micro-batch of its own (never dropped)
    cfg = config(
        backbones, colours, tmp_path / "budget", micro_batch_size=4, grad_accum=1, max_steps=2, max_tokens=1
    )
    session = setup(cfg)
    sampler = session.data.sampler
    assert sampler.max_tokens == 1 and len(sampler.batches()) == len(sampler.lengths) > 2
    assert all(len(b) == 1 for b in sampler.batches())
    assert fit(session)["steps_this_run"] == 2


def test_stage2_rebuilds_a_stage1_connector_of_any_shape(backbones, colours, tmp_path):
    shape = dict(
        connector="resampler", num_queries=3, connector_width=16, connector_layers=1, connector_heads=2
    )
    s1 = config(backbones, colours, tmp_path / "s1", max_steps=1, **shape)
    train(s1)
    s2 = config(
        backbones, colours, tmp_path / "s2", stage=2, init_from=str(tmp_path / "s1"), vision="", llm=""
    )
    session = setup(dataclasses.replace(s2, llm_mode="lora", lora_r=2, lora_alpha=4, max_steps=1))
    connector = session.model.config.connector  # taken from the stage-1 run, not the defaults
    assert (connector.kind, connector.num_queries, connector.hidden_size) == ("resampler", 3, 16)
    assert (connector.num_layers, connector.num_heads) == (1, 2)
    assert fit(session)["step"] == 1


def test_pixel_shuffle_trains_with_a_quarter_of_the_visual_tokens_and_stage2_keeps_it(
    backbones, colours, tmp_path
):
    # the tiny tower's 4×4 patch grid, shuffled by 2: 4 visual tokens per image, in the data and in the splice
    s1 = config(backbones, colours, tmp_path / "s1", max_steps=2, pixel_shuffle=2)
    session = setup(s1)
    assert (
        session.model.num_image_tokens == 4
        and session.model.connector.linear_1.in_features == 4 * session.model.vision.hidden_size
    )
    assert fit(session)["step"] == 2
    s2 = config(
        backbones, colours, tmp_path / "s2", stage=2, init_from=str(tmp_path / "s1"), vision="", llm=""
    )
    session = setup(dataclasses.replace(s2, llm_mode="lora", lora_r=2, lora_alpha=4, max_steps=1))
    assert session.model.config.connector.pixel_shuffle == 2 and session.model.num_image_tokens == 4
    assert fit(session)["step"] == 1
    with pytest.raises(ValueError, match="pixel_shuffle 3 does not divide"):
        setup(config(backbones, colours, tmp_path / "s3", max_steps=1, pixel_shuffle=3))


def test_attention_auto_trains_short_rows_with_eager_and_the_same_weights_as_sdpa(
    backbones, colours, tmp_path
):
    weights, kernels = {}, {}
    for attention in ("auto", "sdpa"):
        session = setup(config(backbones, colours, tmp_path / attention, max_steps=3, attention=attention))
        kernels[attention] = session.model.llm.config._attn_implementation
        fit(session)
        weights[attention] = {n: p.detach().clone() for n, p in session.model.connector.named_parameters()}
    assert kernels == {"auto": "eager", "sdpa": "sdpa"}  # the colour samples are a few dozen tokens long
    for name, w in weights["auto"].items():
        torch.testing.assert_close(w, weights["sdpa"][name], atol=1e-5, rtol=1e-4, msg=name)
    assert (
        load_model_and_config(tmp_path / "auto")[1]["model"]["attn_implementation"] == "auto"
    )  # chosen per run


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["", "z3.json"])
def test_stop_at_step_k_and_resume_matches_an_uninterrupted_run(backbones, colours, tmp_path, zero):
    # stage 2 LoRA with dropout: resuming must restore weights, optimizer, schedule, data position and RNG.
    kw = dict(
        max_steps=7,
        save_every=3,
        keep_last=0,
        llm_mode="lora",
        lora_r=4,
        lora_dropout=0.2,
        lr=3e-3,
        warmup_ratio=0.3,
    )
    kw["zero"] = str(ROOT / "zero_configs" / zero) if zero else ""
    full = config(
        backbones, colours, tmp_path / "full", stage=2, num_workers=2, **kw
    )  # workers prefetch ahead
    train(full)
    # a run stopped after step 3 leaves exactly checkpoint-3 behind (steps cross epoch boundaries: 2 steps/epoch)
    (tmp_path / "stopped").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "stopped" / "checkpoint-3")
    resumed = dataclasses.replace(full, output=str(tmp_path / "stopped"), num_workers=0)
    summary = train(resumed)  # --resume auto: the output directory holds a checkpoint
    assert summary["steps_this_run"] == 4
    a, b = losses(tmp_path / "full"), losses(tmp_path / "stopped")
    assert sorted(b) == [4, 5, 6, 7]
    for step in b:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    with pytest.raises(ValueError, match="was trained with other settings \\(seed: 3 → 4\\)"):
        setup(dataclasses.replace(resumed, seed=4))


@pytest.mark.slow
def test_a_process_killed_while_saving_leaves_the_previous_checkpoint(backbones, colours, tmp_path):
    out = tmp_path / "killed"
    args = [
        sys.executable,
        str(ROOT / "scripts" / "pretrain.py"),
        "--vision",
        backbones["clip"],
        "--llm",
        backbones["llama"],
    ]
    args += [
        "--data",
        colours,
        "--output",
        str(out),
        "--template",
        "plain",
        "--dtype",
        "fp32",
        "--seed",
        "3",
        "--lr",
        "0.01",
    ]
    args += ["--micro-batch-size", "2", "--grad-accum", "2", "--num-workers", "0", "--warmup-ratio", "0"]
    args += ["--max-steps", "12", "--save-every", "1", "--keep-last", "2"]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_PORT")
    }
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    caught = None
    deadline = time.time() + 120
    try:
        while caught is None and proc.poll() is None and time.time() < deadline:
            tmp = [p for p in out.glob(".tmp-checkpoint-*")] if out.exists() else []
            if tmp and int(tmp[0].name.rsplit("-", 1)[1]) >= 3:
                proc.send_signal(signal.SIGSTOP)  # freeze it mid-save, then make sure it really is mid-save
                if tmp[0].exists():
                    caught = tmp[0]
                    proc.kill()
                else:
                    proc.send_signal(signal.SIGCONT)
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()
    assert caught is not None, "never caught the run inside a checkpoint save"
    killed_step = int(caught.name.rsplit("-", 1)[1])
    previous = latest_checkpoint(out)
    assert previous is not None and previous.name == f"checkpoint-{killed_step - 1}"
    verify(previous)
    load_model_and_config(previous)

    cfg = config(backbones, colours, out, max_steps=12, save_every=1, keep_last=2)
    summary = train(cfg)  # resumes automatically from `previous`
    assert summary["steps_this_run"] == 12 - (killed_step - 1)
    assert not list(out.glob(".tmp-checkpoint-*"))
    reference = config(backbones, colours, tmp_path / "reference", max_steps=12, save_every=0)
    train(reference)
    a, b = losses(tmp_path / "reference"), losses(out)
    assert sorted(b) == list(range(1, 13))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5


@pytest.mark.slow
def test_image_folder_for_a_bare_llava_json(backbones, colours, tmp_path):
    """LLaVA's layout: `--data ann/colours.json --image-folder img/`, image paths relative to that folder."""
    import argparse

    from mllm.train.batches import train_recipe
    from mllm.train.config import add_config_arguments

    records = json.loads(Path(colours).read_text())
    for r in records:
        r["image"] = r["image"].removeprefix("img/")
    (tmp_path / "ann").mkdir()
    data = tmp_path / "ann" / "colours.json"
    data.write_text(json.dumps(records))
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    folder = parser.parse_args(["--image-folder", str(Path(colours).parent / "img")]).image_root
    summary = train(config(backbones, str(data), tmp_path / "out", max_steps=1, image_root=folder))
    assert summary["samples"] == 4 and summary["skipped_samples"] == 0
    # without it the images resolve beside the JSON file (where they are not)
    assert train_recipe(config(backbones, str(data), tmp_path / "out2")).image_root == str(tmp_path / "ann")


def fresh_schedule_lrs(cfg, steps: int) -> list[float]:
    """The lr of steps 1..`steps` of a fresh run of `steps` steps: this run's scheduler on a bare optimizer."""
    from mllm.train.optim import make_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = make_scheduler(optimizer, cfg, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.slow
def test_a_run_extended_on_resume_follows_a_fresh_schedule_of_its_new_length(backbones, colours, tmp_path):
    # 2 optimizer steps per epoch: --max-steps 6 and --epochs 3 (with --max-steps 0) are the same 6 steps
    short = config(backbones, colours, tmp_path / "a", max_steps=3, warmup_ratio=0.3, schedule="cosine")
    train(short)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    fresh = fresh_schedule_lrs(dataclasses.replace(short, max_steps=6), 6)
    assert fresh[3] > 0 and len(set(fresh)) == 6  # (the old 3-step schedule ended at lr 0)
    for output, longer in (("a", dict(max_steps=6)), ("b", dict(max_steps=0, epochs=3.0))):
        summary = train(dataclasses.replace(short, output=str(tmp_path / output), **longer))
        assert summary["steps_this_run"] == 3
        lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / output)}
        assert [lrs[k] for k in (4, 5, 6)] == pytest.approx(fresh[3:], rel=1e-6), output
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-6)
    with pytest.raises(ValueError, match="at step 6, past this run's 3 steps"):
        setup(dataclasses.replace(short, output=str(tmp_path / "a")))


def test_resume_refuses_changed_maths_by_name(tmp_path):
    """Learning rate, schedule, accumulation, data contents (same path, edited file): each refused, named."""
    from mllm.checkpoint import mark_complete, write_model_files
    from mllm.data.recipe import data_fingerprint, load_recipe
    from mllm.train.loop import check_resumable

    data = Path(write_colours(tmp_path / "data"))
    cfg = resolve_config(stage=1, vision="v", llm="l", data=str(data), output=str(tmp_path / "out"))
    fingerprint = data_fingerprint(load_recipe(str(data)))
    ckpt = tmp_path / "out" / "checkpoint-3"
    meta = {"run": cfg.to_dict(), "data_fingerprint": fingerprint}
    write_model_files(ckpt, cfg.model_config(), {"connector": {"w": torch.zeros(1)}}, meta=meta)
    mark_complete(ckpt)
    check_resumable(dataclasses.replace(cfg, max_steps=9, epochs=2.0, num_workers=5), ckpt, fingerprint)
    for change, named in (
        (dict(lr=5e-4), "lr: 0.001 → 0.0005"),
        (dict(connector_lr=1e-4), "connector_lr"),
        (dict(schedule="linear"), "schedule: 'cosine' → 'linear'"),
        (dict(warmup_ratio=0.1), "warmup_ratio"),
        (dict(grad_accum=4), "grad_accum: 0 → 4"),
        (dict(global_batch_size=64), "global_batch_size"),
        (dict(max_length=64), "max_length"),
    ):
        with pytest.raises(ValueError, match=named):
            check_resumable(dataclasses.replace(cfg, **change), ckpt, fingerprint)
    moved = tmp_path / "moved" / "colours.json"  # the same data elsewhere: a path is not the data
    shutil.copytree(tmp_path / "data", moved.parent)
    check_resumable(
        dataclasses.replace(cfg, data=str(moved)), ckpt, data_fingerprint(load_recipe(str(moved)))
    )
    records = json.loads(data.read_text())
    records[0]["conversations"][1]["value"] = "It is crimson."
    data.write_text(json.dumps(records))  # same path, other contents
    edited = data_fingerprint(load_recipe(str(data)))
    assert edited != fingerprint
    with pytest.raises(
        ValueError, match=f"data contents of {data} \\(fingerprint {fingerprint} → {edited}\\)"
    ):
        check_resumable(cfg, ckpt, edited)


@pytest.mark.slow
def test_instruction_aware_qformer_trains_end_to_end(backbones, tiny_bert, colours, tmp_path):
    """Stage 2 InstructBLIP-style (the question enters a text-aware Q-Former started from a BERT): batches carry
    the instruction ids, the checkpoint keeps the Q-Former's tokenizer, generation reads them."""
    from mllm.checkpoint import QFORMER_TOKENIZER_DIR
    from mllm.inference import Conversation, Processor, generate_batch

    qformer = dict(connector="qformer", num_queries=4, qformer_text=True, qformer_init=tiny_bert)
    s2 = config(backbones, colours, tmp_path / "s2", stage=2, instruction_aware=True, **qformer)
    session = setup(dataclasses.replace(s2, llm_mode="lora", lora_r=2, lora_alpha=4, max_steps=1))
    batch = session.data.loader.collate_fn([session.data.dataset[0], session.data.dataset[1]])
    assert batch["qformer_input_ids"].shape[0] == 2 and batch["qformer_attention_mask"].sum() > 2
    tok = session.model.connector.tokenizer
    assert tok.decode(batch["qformer_input_ids"][0], skip_special_tokens=True) == "what colour is this?"
    assert fit(session)["step"] == 1

    ckpt = latest_checkpoint(tmp_path / "s2")
    assert (ckpt / QFORMER_TOKENIZER_DIR / "tokenizer_config.json").is_file()
    model, saved = load_model_and_config(ckpt)
    processor = Processor.from_checkpoint(model, saved)
    image = Image.new("RGB", (32, 32), COLOURS["red"])
    a = processor([Conversation.single("What colour is this?", [image])])
    b = processor([Conversation.single("Is it a circle?", [image])])
    with torch.no_grad():
        va, vb = (model.encode_images(x["pixel_values"], None, x["qformer_input_ids"]) for x in (a, b))
    assert not torch.allclose(va, vb, atol=1e-6), "the instruction steers the visual tokens"
    assert isinstance(generate_batch(model, processor, [Conversation.single("Colour?", [image])])[0], str)


@pytest.mark.slow
def test_a_transformers_blip2_fine_tunes_with_lora_and_exports_back(backbones, colours, tmp_path):
    """`mllm import` a tiny transformers BLIP-2 → stage 2 LoRA from it → `mllm export --format hf-blip2`: the
    transformers model computes the fine-tuned checkpoint's logits."""
    import transformers

    from mllm.cli import main
    from mllm.config import IMAGE_TOKEN_ID
    from mllm.inference import Conversation, load_pretrained
    from mllm.testing.backbones import make_blip2

    source = make_blip2(str(tmp_path / "blip2"), backbones["llama"])
    assert main(["import", source, str(tmp_path / "imported")]) == 0
    cfg = config(
        backbones, colours, tmp_path / "ft", stage=2, init_from=str(tmp_path / "imported"), vision="", llm=""
    )
    summary, changed, _ = run_and_diff(
        dataclasses.replace(cfg, llm_mode="lora", lora_r=2, lora_alpha=4, max_steps=1)
    )
    assert (
        summary["step"] == 1
        and any("lora_" in n for n in changed)
        and any("connector.qformer" in n for n in changed)
    )
    assert main(["export", str(tmp_path / "ft"), str(tmp_path / "hf"), "--format", "hf-blip2"]) == 0

    model, processor = load_pretrained(str(tmp_path / "ft"))
    batch = processor(
        [Conversation.single("What colour is this?", [Image.new("RGB", (32, 32), COLOURS["red"])])]
    )
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(
        tmp_path / "hf", dtype=torch.float32
    ).eval()
    ids = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, hf.config.image_token_id)
    with torch.no_grad():
        ours = model(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_counts")},
            return_logits=True,
        ).logits
        theirs = hf(
            input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        ).logits
    assert (theirs[..., : ours.shape[-1]] - ours).abs().max().item() <= 1e-4


def test_mir_is_logged_as_stage_1_trains_and_matches_eval_of_the_saved_model(backbones, colours, tmp_path):
    """--mir-data: MIR before the first step, every --mir-every steps and at the end (mir.jsonl); the last one is
    what `mllm eval --task alignment` measures on the checkpoint the run saved (same model, same encoding)."""
    from mllm.cli import main
    from mllm.train.progress import ALIGNMENT_FILE

    out = tmp_path / "s1"
    summary = train(config(backbones, colours, out, max_steps=3, mir_data=colours, mir_every=2))
    records = [json.loads(line) for line in (out / ALIGNMENT_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 3]
    assert all(math.isfinite(r["mir"]) and len(r["per_layer"]) == 2 for r in records)
    assert records[0]["mir"] != records[-1]["mir"]  # the connector moved: so did its tokens inside the LLM
    assert records[0]["n_visual"] == 8 * 16  # the 8 colour images, the tiny CLIP's 16 patches each
    argv = [
        "eval",
        summary["checkpoint"],
        "--data",
        colours,
        "--task",
        "alignment",
        "--output",
        str(tmp_path / "e"),
    ]
    assert main([*argv, "--no-progress"]) == 0
    scores = json.loads((tmp_path / "e" / "scores.json").read_text())
    assert scores["mir"] == pytest.approx(records[-1]["mir"], abs=1e-4)
