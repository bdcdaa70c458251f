"""Training checkpoints: the self-contained model files of `mllm.checkpoint` plus what resuming needs.

    checkpoint-N/
        mllm_config.json, connector.safetensors, adapter/ ...   loadable by mllm.load_checkpoint, no DeepSpeed
        engine/               DeepSpeed: optimizer, scheduler, ZeRO partitions of every rank
        rank{R}_state.pt      RNG states and the sampler position of rank R
        trainer_state.json    step, samples and tokens seen, world size
        COMPLETE              written last (manifest)

Every rank writes into `.tmp-checkpoint-N`; rank 0 marks it complete and
renames it, so a crash at any moment leaves either the old or the new
checkpoint, never a half-written one that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm.checkpoint import (
    DISCARD_PREFIX,
    CheckpointError,
    check_finite,
    discard,
    latest_checkpoint,
    list_checkpoints,
    mark_complete,
    nonfinite_tensors,
    publish,
    trainable_state_dicts,
    verify,
    write_model_files,
)
from mllm.train import distributed as dist
from mllm.train.config import TrainConfig

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-checkpoint-"
TRAINER_STATE = "trainer_state.json"
SLOW_SAVE_ENV = "MLLM_TEST_SLOW_SAVE_S"
"""Test hook, read only by `save`: every rank waits this many seconds inside each save, before the checkpoint is
marked complete (tests of a SIGTERM that arrives while a long save is under way). Unset in real runs."""


def rank_state_file(rank: int) -> str:
    return f"rank{rank}_state.pt"


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, tuples and numbers only, so that `torch.load(weights_only=True)` reads it."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_meta(cfg: TrainConfig, recipe, step: int) -> dict[str, Any]:
    """What chat and eval need beside the weights: the template and prompt settings, and the whole run."""
    return {
        "template": recipe.template,
        "system_prompt": recipe.system_prompt,
        "max_length": recipe.max_length,
        "stage": cfg.stage,
        "step": step,
        "run": cfg.to_dict(),
    }


def save(
    engine,
    model,
    world: dist.World,
    cfg: TrainConfig,
    step: int,
    stream_state: dict,
    trainer_state: dict,
    meta: dict,
) -> Path:
    """Write checkpoint-`step` atomically (a collective call: every rank must make it)."""
    out = Path(cfg.output)
    tmp, final = out / f"{TMP_PREFIX}{step}", out / f"checkpoint-{step}"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    trainable = [p for p in model.parameters() if p.requires_grad]
    with dist.gathered(trainable):
        weights = trainable_state_dicts(model) if world.is_main else None
    bad = [f"{c}.{k}" for c, sd in weights.items() for k in nonfinite_tensors(sd)] if world.is_main else []
    if dist.any_rank(bool(bad), world.device):  # every rank refuses together; the older checkpoints stay
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"refusing to write checkpoint-{step}: trainable weights are not finite ({bad[:3] or 'found by rank 0'}); "
            f"the newest checkpoint stays {latest_checkpoint(out)}"
        )
    dist.save_engine_state(engine, tmp)
    torch.save({"rng": rng_state(), "sampler": stream_state}, tmp / rank_state_file(world.rank))
    # test hook: a save that takes long (see SLOW_SAVE_ENV)
    time.sleep(float(os.environ.get(SLOW_SAVE_ENV, "0")))
    if world.is_main:
        adapter_config = (
            model.llm.peft_config["default"] if model.config.llm.mode in ("lora", "qlora") else None
        )
        write_model_files(
            tmp,
            model.config,
            weights,
            meta=meta,
            adapter_config=adapter_config,
            connector_tokenizer=getattr(model.connector, "tokenizer", None),
        )
        (tmp / TRAINER_STATE).write_text(json.dumps({**trainer_state, "world_size": world.size}, indent=1))
    dist.barrier()
    if world.is_main:
        mark_complete(tmp)
        publish(tmp, final)
        prune(out, cfg.keep_last)
    dist.barrier()
    return final


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir` that pass verification, oldest first."""
    complete = []
    for _step, path in list_checkpoints(output_dir):
        try:
            verify(path)
            complete.append(path)
        except CheckpointError:
            continue
    return complete


def prune(output_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (0 = keep all)."""
    if keep_last <= 0:
        return
    for path in complete_checkpoints(output_dir)[:-keep_last]:
        discard(path)


def clear_interrupted(output_dir: Path) -> None:
    """Remove temporary folders a crashed save or deletion left behind (they never count as checkpoints)."""
    for p in [*Path(output_dir).glob(f"{TMP_PREFIX}*"), *Path(output_dir).glob(f"{DISCARD_PREFIX}*")]:
        log.warning("removing %s, left by an interrupted checkpoint save", p)
        shutil.rmtree(p, ignore_errors=True)


def saved_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / TRAINER_STATE).read_text())["step"])


def find_resume_point(cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from, per --resume (auto | latest | no | a path). Every file it holds is checked
    against its recorded hash (unless --no-verify): a damaged newest one is skipped with a warning (auto,
    latest), a damaged one named by path is an error naming the file."""
    if cfg.resume == "no":
        return None
    hashed = () if cfg.no_verify else "all"
    if cfg.resume in ("auto", "latest"):
        found = latest_checkpoint(cfg.output, hashed)
        if found is None and cfg.resume == "latest":
            raise FileNotFoundError(f"--resume: {cfg.output} holds no complete checkpoint to continue from")
        return found
    path = Path(cfg.resume)
    verify(path, hashed)
    return path


def check_finite_weights(model, checkpoint: Path) -> None:
    """Raise `CheckpointError` naming `checkpoint` and the tensor if a trainable weight just restored from it is
    NaN/Inf (a collective call under ZeRO-3: every rank gathers, every rank checks the same values)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with dist.gathered([p for _, p in named]):
        check_finite({n: p.detach() for n, p in named}, checkpoint / dist.ENGINE_TAG)


def saved_world_size(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / TRAINER_STATE).read_text())["world_size"])


def restore(engine, world: dist.World, checkpoint: Path, stream) -> dict[str, Any]:
    """Load engine, RNG and sampler state of `checkpoint`; returns its trainer state.

    Written by as many processes as this run has, everything is restored exactly. Written by another number,
    see `restore_resharded`."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    if state["world_size"] != world.size:
        restore_resharded(engine, world, checkpoint, stream, state["world_size"])
        return state
    dist.load_engine_state(engine, checkpoint)
    mine = torch.load(checkpoint / rank_state_file(world.rank), weights_only=True)
    stream.load_state_dict(mine["sampler"])
    set_rng_state(mine["rng"])
    return state


def restore_resharded(engine, world: dist.World, checkpoint: Path, stream, saved_world_size: int) -> None:
    """Continue on `world.size` processes a checkpoint written by `saved_world_size` (elastic resume).

    The engine state goes through DeepSpeed's universal checkpoint (converted once, by rank 0, into a scratch
    folder beside the checkpoint, removed after loading): fp32 weights, Adam moments and step, scheduler.
    The data continue at the same global sample position (every rank of the old run had trained on the
    same number of micro-batches; rank 0's state says where all stand). The RNG streams are not carried over:
    there were `saved_world_size` of them; each rank keeps the one seeded for it (seed + rank).
    The engine must have been made with `dist.expect_universal_checkpoint`."""
    scratch = checkpoint.parent / f"{TMP_PREFIX}universal-{checkpoint.name}"
    if world.is_main:
        log.info(
            "%s was written by %d process(es); resharding it for %d", checkpoint, saved_world_size, world.size
        )
        shutil.rmtree(scratch, ignore_errors=True)
        dist.make_universal(checkpoint, scratch)
    dist.barrier()
    try:
        dist.load_engine_state(engine, scratch)
        first = torch.load(checkpoint / rank_state_file(0), weights_only=True)
        stream.load_state_dict(first["sampler"])
        dist.barrier()
    finally:
        if world.is_main:
            shutil.rmtree(scratch, ignore_errors=True)
