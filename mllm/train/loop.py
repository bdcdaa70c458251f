"""The training run, start to end: assemble model and data, wrap in DeepSpeed, loop, checkpoint, report.

One optimizer step = `grad_accum` micro-batches per process. The loss of the
step is the sum of token losses over every supervised token of all those
micro-batches on all processes, divided by their number: a long answer weighs
as much per token as a short one, whatever batch it fell into.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file

from mllm.checkpoint import read_config
from mllm.config import ModelConfig
from mllm.data.collate import round_up
from mllm.model import build_model, load_tokenizer, resolve_runtime
from mllm.model.runtime import training_attention
from mllm.train import checkpointing, preflight
from mllm.train import distributed as dist
from mllm.train.batches import (
    BatchStream,
    ExplicitMask,
    TrainData,
    build_train_data,
    model_inputs,
    supervised_tokens,
)  # fmt: skip
from mllm.train.config import TrainConfig, save_yaml
from mllm.train.optim import make_scheduler, param_groups
from mllm.train.progress import Progress, format_summary
from mllm.train.stop import StopRequest

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.yaml"


@dataclass
class Session:
    """Everything a run holds between setup and the end of its loop."""

    cfg: TrainConfig
    world: dist.World
    model: Any
    engine: Any
    data: TrainData
    stream: BatchStream
    state: dict[str, int]
    total_steps: int
    grad_accum: int


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or continue) the training `cfg` describes; returns the end summary."""
    return fit(setup(cfg))


def setup(cfg: TrainConfig) -> Session:
    """Process group, model, data, DeepSpeed engine; restored from a checkpoint when resuming."""
    cfg = absolute_paths(fill_from_init(cfg))
    cfg.check_complete()
    preflight.check_output_writable(Path(cfg.output))  # every rank, before any of them waits for another
    ds_raw = dist.read_ds_config(cfg)
    dist.check_supported(cfg.llm_mode, ds_raw)
    world = dist.init_distributed()
    if not world.is_main:
        logging.getLogger("mllm").setLevel(logging.WARNING)
        transformers.logging.set_verbosity_error()
    out = Path(cfg.output)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        checkpointing.clear_interrupted(out)
    dist.barrier()
    resume_from = checkpointing.find_resume_point(cfg)
    if resume_from is not None:
        check_resumable(cfg, resume_from)
    grad_accum = cfg.grad_accum or max(1, cfg.global_batch_size // (cfg.micro_batch_size * world.size))

    transformers.set_seed(cfg.seed)  # same connector initialisation on every rank
    mcfg = cfg.model_config()
    runtime = resolve_runtime(mcfg.dtype, mcfg.attn_implementation, str(world.device))
    model = build_model(mcfg, runtime)
    if cfg.init_from:
        load_stage1_connector(model, cfg.init_from)
    if cfg.grad_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tokenizer = load_tokenizer(mcfg)
    data = build_train_data(cfg, tokenizer, model, world.rank, world.size, progress=world.is_main)
    model.loss_chunk_size = cfg.loss_chunk_size or None
    compiled = use_compile(cfg, runtime, ds_raw)
    runtime = use_training_attention(model, cfg, runtime, data, compiled)
    if compiled:
        compile_decoder_layers(model, data, runtime)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(data.sampler) / grad_accum))
    start_step = checkpointing.saved_step(resume_from) if resume_from is not None else 0
    preflight.check_disk_space(
        out,
        preflight.checkpoint_bytes(model),
        preflight.checkpoints_needed(
            total_steps,
            start_step,
            cfg.save_every,
            cfg.keep_last,
            len(checkpointing.complete_checkpoints(out)),
        ),
    )

    ds = dist.fill_ds_config(
        ds_raw,
        cfg,
        grad_accum,
        world.size,
        runtime.dtype == torch.bfloat16,
        model.llm.config.hidden_size,
    )
    optimizer = dist.make_optimizer(param_groups(model, cfg), ds, cfg.weight_decay)
    engine = dist.initialize(model, optimizer, make_scheduler(optimizer, cfg, total_steps), ds)
    stream = BatchStream(data)
    state = {"step": 0, "samples": 0, "tokens": 0}
    transformers.set_seed(cfg.seed + world.rank)  # dropout differs per rank, repeats per seed
    if resume_from is not None:
        state.update(checkpointing.restore(engine, world, resume_from, stream))
        log.info("resumed from %s at step %d (epoch %.3f)", resume_from, state["step"], stream.epoch_progress)
    if world.is_main:
        save_yaml(cfg, out / RUN_CONFIG_FILE)
        log.info(
            "stage %d: %d steps × %d micro-batches of %d × %d process(es); ZeRO-%d; %s",
            cfg.stage, total_steps, grad_accum, cfg.micro_batch_size, world.size, dist.zero_stage(ds), runtime.describe(),
        )  # fmt: skip
    return Session(cfg, world, model, engine, data, stream, state, total_steps, grad_accum)


def use_training_attention(model, cfg: TrainConfig, runtime, data: TrainData, compiled: bool = False):
    """Switch the LLM to the attention kernel `training_attention` picks for this data; returns the runtime."""
    multiple = cfg.pad_to_multiple_of
    longest = max(data.dataset.lengths, default=0)
    if cfg.packing != "off":
        longest = max(longest, cfg.pack_row_tokens)
    attention = training_attention(cfg.attention, runtime, round_up(longest, multiple), compiled)
    if attention == runtime.attn_implementation:
        return runtime
    model.llm.set_attn_implementation(attention)  # a PeftModel hands the call on to the model it wraps
    return dataclasses.replace(runtime, attn_implementation=attention)


def use_compile(cfg: TrainConfig, runtime, ds: dict[str, Any]) -> bool:
    """Whether this run compiles its decoder layers: --compile on, or auto where it was measured to pay (nowhere
    yet: on this CPU a run's compile time outweighed its faster steps; see the README's performance section)."""
    if cfg.compile != "on":
        return False
    if dist.zero_stage(ds) == 3:
        raise ValueError(
            "--compile on cannot run under ZeRO-3 (its parameter gathers hook every layer the compiler would "
            "trace); use ZeRO-2 (the default --zero) or --compile off"
        )
    return True


def compile_decoder_layers(model, data: TrainData, runtime) -> int:
    """torch.compile every decoder layer of the LLM in place (dynamic shapes: one compile serves all lengths) and
    give every batch its explicit mask (see `ExplicitMask`); returns how many layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.llm.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(dynamic=True)
    additive = runtime.dtype if runtime.attn_implementation == "eager" else None
    data.explicit_mask = ExplicitMask(additive)
    log.info("compiled %d decoder layers (%s attention)", len(layers), runtime.attn_implementation)
    return len(layers)


def fit(s: Session) -> dict[str, Any]:
    """The loop, then the report; a SIGTERM ends it early with a checkpoint."""
    progress = Progress(
        Path(s.cfg.output), s.total_steps, s.state["step"], s.world.is_main, s.cfg.log_every,
        already_spent=s.data.feature_cache_fill_s,  # the cache's fill is part of what this run cost
    )  # fmt: skip
    try:
        with StopRequest() as stop:
            last_saved, stopped_by = run_steps(s, progress, stop)
    finally:
        s.stream.close()  # DataLoader workers end now, not at interpreter exit
    state = s.state
    skipped = s.data.dataset.skipped()
    extra = {
        **state,
        "checkpoint": str(last_saved) if last_saved else None,
        "skipped_samples": len(skipped),
        "feature_cache_fill_s": round(s.data.feature_cache_fill_s, 2),
    }
    if stopped_by:
        extra["stopped_by"] = stopped_by
        if s.world.is_main:
            log.warning(
                "stopped by %s at step %d of %d; %s is complete: run the same command again to continue",
                stopped_by, state["step"], s.total_steps, last_saved,
            )  # fmt: skip
    if skipped and s.world.is_main:
        log.warning("skipped %d bad sample(s); every one and why: %s", len(skipped), s.data.dataset.skip_log)
    summary = progress.finish(extra)
    if s.world.is_main:
        log.info(format_summary(summary))
    return summary


def run_steps(s: Session, progress: Progress, stop: StopRequest) -> tuple[Path | None, str | None]:
    """Optimizer steps until the last one or a stop request; checkpoints on schedule, at the end and on stopping.
    Returns the last checkpoint written and the signal that stopped the run, if one did."""
    cfg, state = s.cfg, s.state
    last_saved, stopped_by = None, None
    while state["step"] < s.total_steps and stopped_by is None:
        lr = s.engine.lr_scheduler.get_last_lr()[-1]  # the lr this step uses (the scheduler moves after it)
        record = train_step(s.engine, s.stream, s.world, s.grad_accum)
        state["step"] += 1
        state["samples"] += record["samples"]
        state["tokens"] += record["tokens"]
        progress.step(
            state["step"],
            record["loss"],
            lr,
            dist.grad_norm(s.engine),
            record["samples"],
            record["tokens"],
            s.stream.epoch_progress,
        )
        if dist.any_rank(stop.requested, s.world.device):  # a save is collective: all ranks stop together
            stopped_by = signal_name(stop.signal)
        due = state["step"] == s.total_steps or (cfg.save_every and state["step"] % cfg.save_every == 0)
        if stopped_by or due:
            meta = checkpointing.model_meta(cfg, s.data.recipe, state["step"])
            last_saved = checkpointing.save(
                s.engine, s.model, s.world, cfg, state["step"], s.stream.state_dict(), dict(state), meta
            )
    return last_saved, stopped_by


def train_step(engine, stream: BatchStream, world: dist.World, grad_accum: int) -> dict[str, Any]:
    """One optimizer step over `grad_accum` micro-batches; returns the step's loss, samples and tokens (all ranks)."""
    batches = [stream.next() for _ in range(grad_accum)]
    counts = [supervised_tokens(b) for b in batches]
    # rows of samples: a skipped bad sample has none, and a blank image row (see BlankImageRow) is no sample
    samples = sum(len(b["sample_lengths"]) for b in batches)
    total_tokens, total_samples = dist.all_reduce_sum([sum(counts), samples], world.device)
    # DeepSpeed averages gradients over processes; × world size turns that back into a sum over all tokens.
    scale = world.size / max(total_tokens, 1.0)
    loss_sum = 0.0
    for batch in batches:  # (one whose samples were all bad is a blank row alone: a pass that learns nothing)
        out = engine(**model_inputs(batch, world.device))
        dist.backward(engine, out.loss_sum * scale)
        dist.step(engine)
        loss_sum += float(out.loss_sum.detach())
    (global_loss_sum,) = dist.all_reduce_sum([loss_sum], world.device)
    return {
        "loss": global_loss_sum / max(total_tokens, 1.0),
        "samples": int(total_samples),
        "tokens": int(total_tokens),
    }


def signal_name(signum: int | None) -> str:
    """The signal's name; a rank stopping because a peer was signalled has none of its own: SIGTERM."""
    return signal.Signals(signum).name if signum else "SIGTERM"


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute, so that checkpoints and run_config.yaml work from any directory (hub ids stay)."""
    values = cfg.to_dict()
    for key in ("vision", "llm", "data", "output", "zero", "init_from", "feature_cache"):
        if values[key] and (key in ("output", "feature_cache") or Path(values[key]).exists()):
            values[key] = str(Path(values[key]).expanduser().resolve())
    if values["resume"] not in ("auto", "latest", "no"):
        values["resume"] = str(Path(values["resume"]).expanduser().resolve())
    return TrainConfig(**values)


# ---- stage 2 from stage 1 ---------------------------------------------------------------------------
def fill_from_init(cfg: TrainConfig) -> TrainConfig:
    """Stage 2: take vision tower and connector settings (and the LLM, if not given) from the stage-1 checkpoint."""
    if not cfg.init_from:
        return cfg
    saved = ModelConfig.from_dict(read_config(cfg.init_from)["model"])
    if cfg.vision and Path(cfg.vision).resolve() != Path(saved.vision.path).resolve():
        raise ValueError(
            f"--vision {cfg.vision} differs from the stage-1 tower {saved.vision.path} of --init-from {cfg.init_from}"
        )
    values = cfg.to_dict()
    values.update(
        vision=saved.vision.path,
        vision_kind=saved.vision.kind,
        vision_feature_layer=saved.vision.feature_layer,
        vision_pool=saved.vision.pool,
        connector=saved.connector.kind,
        projector=saved.connector.projector,
        num_queries=saved.connector.num_queries,
        connector_layers=saved.connector.num_layers,
        connector_width=saved.connector.hidden_size,
        connector_heads=saved.connector.num_heads,
        llm=cfg.llm or saved.llm.path,
    )
    return TrainConfig(**values)


def load_stage1_connector(model, init_from: str) -> None:
    path = Path(read_config(init_from)["_path"])
    weights = load_file(str(path / "connector.safetensors"))
    try:
        model.connector.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(
            f"--init-from {path}: its connector does not fit this model ({str(e).splitlines()[1:2]})"
        ) from e
    log.info("connector initialised from %s", path)


def check_resumable(cfg: TrainConfig, checkpoint: Path) -> None:
    """Refuse to continue a checkpoint under settings that would change the data order or the model."""
    saved = read_config(checkpoint).get("run", {})
    fixed = (
        "stage",
        "vision",
        "llm",
        "llm_mode",
        "connector",
        "projector",
        "data",
        "seed",
        "micro_batch_size",
        "max_tokens",
        "lora_r",
    )
    changed = [
        f"{k}: {saved.get(k)!r} → {getattr(cfg, k)!r}"
        for k in fixed
        if k in saved and saved[k] != getattr(cfg, k)
    ]
    if changed:
        raise ValueError(
            f"{checkpoint} was trained with other settings ({'; '.join(changed)}); "
            "use another --output, or --resume no to start over there"
        )
