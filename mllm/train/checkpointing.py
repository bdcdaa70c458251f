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
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm.checkpoint import (
    DISCARD_PREFIX,
    CheckpointError,
    discard,
    latest_checkpoint,
    list_checkpoints,
    mark_complete,
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
    dist.save_engine_state(engine, tmp)
    torch.save({"rng": rng_state(), "sampler": stream_state}, tmp / rank_state_file(world.rank))
    trainable = [p for p in model.parameters() if p.requires_grad]
    with dist.gathered(trainable):
        weights = trainable_state_dicts(model) if world.is_main else None
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
    """The checkpoint to continue from, per --resume (auto | latest | no | a path)."""
    if cfg.resume == "no":
        return None
    if cfg.resume in ("auto", "latest"):
        found = latest_checkpoint(cfg.output)
        if found is None and cfg.resume == "latest":
            raise FileNotFoundError(f"--resume: {cfg.output} holds no complete checkpoint to continue from")
        return found
    path = Path(cfg.resume)
    verify(path)
    return path


def restore(engine, world: dist.World, checkpoint: Path, stream) -> dict[str, Any]:
    """Load engine, RNG and sampler state of `checkpoint`; returns its trainer state."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    if state["world_size"] != world.size:
        raise ValueError(
            f"{checkpoint} was written by {state['world_size']} process(es), this run has {world.size}: "
            "resume with the same number of processes to continue with the same data order"
        )
    dist.load_engine_state(engine, checkpoint)
    mine = torch.load(checkpoint / rank_state_file(world.rank), weights_only=True)
    stream.load_state_dict(mine["sampler"])
    set_rng_state(mine["rng"])
    return state
