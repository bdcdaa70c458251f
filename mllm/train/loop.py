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

from mllm.checkpoint import QFORMER_TOKENIZER_DIR, latest_checkpoint, read_config, read_weights, verify
from mllm.config import ConnectorConfig, ModelConfig
from mllm.data.collate import round_up
from mllm.data.recipe import data_fingerprint
from mllm.model import build_model, load_tokenizer, resolve_runtime
from mllm.model.runtime import training_attention
from mllm.model.trainability import format_parameter_table, parameter_table
from mllm.train import checkpointing, nonfinite, preflight
from mllm.train import distributed as dist
from mllm.train.batches import (
    BatchStream,
    ExplicitMask,
    TrainData,
    build_train_data,
    model_inputs,
    supervised_tokens,
    train_recipe,
)  # fmt: skip
from mllm.train.config import TrainConfig, save_yaml
from mllm.train.optim import make_scheduler, param_groups, schedule_from
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
    data_fingerprint: str
    """`mllm.data.recipe.data_fingerprint` of the run's data, saved in each checkpoint; resuming compares it."""
    skips: nonfinite.Skips
    fault: nonfinite.Fault | None = None


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
    fingerprint = data_fingerprint(train_recipe(cfg))
    if resume_from is not None:
        check_resumable(cfg, resume_from, fingerprint)
    grad_accum = cfg.grad_accum or max(1, cfg.global_batch_size // (cfg.micro_batch_size * world.size))

    transformers.set_seed(cfg.seed)  # same connector initialisation on every rank
    mcfg = cfg.model_config()
    if cfg.init_from:
        mcfg.connector = stage1_connector_config(cfg)
    runtime = resolve_runtime(mcfg.dtype, mcfg.attn_implementation, str(world.device))
    model = build_model(mcfg, runtime)
    log.info("parameters:\n%s", format_parameter_table(parameter_table(model)))
    if cfg.init_from:
        load_stage1_connector(model, cfg.init_from, verify_hashes=not cfg.no_verify)
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
    if start_step > total_steps:
        raise ValueError(
            f"{resume_from} is at step {start_step}, past this run's {total_steps} steps: raise --max-steps or "
            "--epochs to continue it"
        )
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
    if resume_from is not None and checkpointing.saved_world_size(resume_from) != world.size:
        ds = dist.expect_universal_checkpoint(ds)  # elastic resume: see checkpointing.restore_resharded
    optimizer = dist.make_optimizer(param_groups(model, cfg), ds, cfg.weight_decay)
    engine = dist.initialize(model, optimizer, make_scheduler(optimizer, cfg, total_steps), ds)
    stream = BatchStream(data)
    state = {"step": 0, "samples": 0, "tokens": 0, "skipped_steps": 0}
    transformers.set_seed(cfg.seed + world.rank)  # dropout differs per rank, repeats per seed
    if resume_from is not None:
        state.update(checkpointing.restore(engine, world, resume_from, stream))
        # on this run's schedule: --max-steps / --epochs (the run's length) may have changed
        schedule_from(engine.lr_scheduler, state["step"])
        checkpointing.check_finite_weights(model, resume_from)
        log.info("resumed from %s at step %d (epoch %.3f)", resume_from, state["step"], stream.epoch_progress)
    if world.is_main:
        save_yaml(cfg, out / RUN_CONFIG_FILE)
        log.info(
            "stage %d: %d steps × %d micro-batches of %d × %d process(es); ZeRO-%d; %s",
            cfg.stage, total_steps, grad_accum, cfg.micro_batch_size, world.size, dist.zero_stage(ds), runtime.describe(),
        )  # fmt: skip
    skips = nonfinite.Skips(cfg.max_skipped_steps)
    fault = nonfinite.Fault.from_env()
    return Session(
        cfg, world, model, engine, data, stream, state, total_steps, grad_accum, fingerprint, skips, fault
    )


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
        if s.world.is_main and stopped_by != nonfinite.STOPPED:
            log.warning(
                "stopped by %s at step %d of %d; %s is complete: run the same command again to continue",
                stopped_by, state["step"], s.total_steps, last_saved,
            )  # fmt: skip
    if skipped and s.world.is_main:
        log.warning("skipped %d bad sample(s); every one and why: %s", len(skipped), s.data.dataset.skip_log)
    summary = progress.finish(extra)
    if stopped_by == nonfinite.STOPPED:
        raise nonfinite.NonFiniteTraining(s.skips.message(latest_checkpoint(s.cfg.output)))
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
        record = train_step(s.engine, s.stream, s.world, s.grad_accum, state["step"] + 1, s.fault)
        state["step"] += 1
        state["samples"] += record["samples"]
        state["tokens"] += record["tokens"]
        state["skipped_steps"] += record["skipped"] is not None
        s.skips.update(state["step"], record["skipped"], record["sample_ids"], s.world.rank)
        progress.step(
            state["step"],
            record["loss"],
            lr,
            dist.grad_norm(s.engine),
            record["samples"],
            record["tokens"],
            s.stream.epoch_progress,
            skipped=record["skipped"],
            skipped_steps=state["skipped_steps"],
        )
        if s.skips.exhausted:  # the same on every rank: stop before anything is saved
            return last_saved, nonfinite.STOPPED
        if dist.any_rank(stop.requested, s.world.device):  # a save is collective: all ranks stop together
            stopped_by = signal_name(stop.signal)
        due = state["step"] == s.total_steps or (cfg.save_every and state["step"] % cfg.save_every == 0)
        if stopped_by or due:
            meta = checkpointing.model_meta(cfg, s.data.recipe, state["step"])
            meta["data_fingerprint"] = s.data_fingerprint
            last_saved = checkpointing.save(
                s.engine, s.model, s.world, cfg, state["step"], s.stream.state_dict(), dict(state), meta
            )
    return last_saved, stopped_by


def train_step(
    engine,
    stream: BatchStream,
    world: dist.World,
    grad_accum: int,
    step: int,
    fault: nonfinite.Fault | None = None,
) -> dict[str, Any]:
    """Optimizer step `step` over `grad_accum` micro-batches; returns the step's loss, samples and tokens (all
    ranks), the sample ids of this rank's micro-batches, and what made the step skip (None: it was applied).
    `fault` is the test hook of `nonfinite.FAULT_ENV`."""
    batches = [stream.next() for _ in range(grad_accum)]
    counts = [supervised_tokens(b) for b in batches]
    # rows of samples: a skipped bad sample has none, and a blank image row (see BlankImageRow) is no sample
    samples = sum(len(b["sample_lengths"]) for b in batches)
    total_tokens, total_samples = dist.all_reduce_sum([sum(counts), samples], world.device)
    # DeepSpeed averages gradients over processes; × world size turns that back into a sum over all tokens.
    scale = world.size / max(total_tokens, 1.0)
    loss_sum, discard = 0.0, False
    # (a micro-batch whose samples were all bad is a blank row alone: a pass that learns nothing)
    for i, batch in enumerate(batches):
        out = engine(**model_inputs(batch, world.device))
        loss = fault.apply(out.loss_sum, step, world.rank) if fault else out.loss_sum
        loss_sum += float(loss.detach())
        if i == len(batches) - 1:  # a non-finite loss on any rank discards the step on every rank
            discard = dist.any_rank(not math.isfinite(loss_sum), world.device)
        dist.backward(engine, loss * scale, discard=discard)
        dist.step(engine)
    global_loss_sum, not_applied = dist.all_reduce_sum(
        [loss_sum, float(not dist.step_applied(engine))], world.device
    )
    return {
        "loss": global_loss_sum / max(total_tokens, 1.0),
        "samples": int(total_samples),
        "tokens": int(total_tokens),
        "sample_ids": [list(b["sample_ids"]) for b in batches],
        "skipped": nonfinite.skip_reason(discard, not_applied > 0),
    }


def signal_name(signum: int | None) -> str:
    """The signal's name; a rank stopping because a peer was signalled has none of its own: SIGTERM."""
    return signal.Signals(signum).name if signum else "SIGTERM"


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute, so that checkpoints and run_config.yaml work from any directory (hub ids stay)."""
    values = cfg.to_dict()
    for key in ("vision", "llm", "data", "image_root", "output", "zero", "init_from", "feature_cache"):
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
        image_aspect=saved.vision.image_aspect,  # stage 1's connector (and its image_newline) was trained on it
        grid_pinpoints=",".join(f"{h}x{w}" for h, w in saved.vision.grid_pinpoints),
        max_tiles=saved.vision.max_tiles,
        connector=saved.connector.kind,
        projector=saved.connector.projector,
        pixel_shuffle=saved.connector.pixel_shuffle,
        num_queries=saved.connector.num_queries,
        connector_layers=saved.connector.num_layers,
        connector_width=saved.connector.hidden_size,
        connector_heads=saved.connector.num_heads,
        qformer_text=saved.connector.qformer_text,
        llm=cfg.llm or saved.llm.path,
    )
    return TrainConfig(**values)


def stage1_connector_config(cfg: TrainConfig) -> ConnectorConfig:
    """The connector exactly as `--init-from` saved it (every size; its Q-Former tokenizer from that checkpoint).

    Only whether the Q-Former reads the instruction is this run's choice: stage 1 captions have none to read.
    """
    saved = read_config(cfg.init_from)
    connector = ModelConfig.from_dict(saved["model"]).connector
    tokenizer_dir = Path(saved["_path"]) / QFORMER_TOKENIZER_DIR
    return dataclasses.replace(
        connector,
        qformer_init="",  # its weights come from the checkpoint
        qformer_tokenizer=str(tokenizer_dir) if tokenizer_dir.is_dir() else connector.qformer_tokenizer,
        instruction_aware=cfg.instruction_aware,
    )


def load_stage1_connector(model, init_from: str, verify_hashes: bool = True) -> None:
    """Load the connector of the stage-1 checkpoint `init_from` into `model` (hash-checked unless told not to,
    every tensor finite)."""
    path = Path(read_config(init_from)["_path"])
    if verify_hashes:
        verify(path, hashed=["connector.safetensors"])
    weights = read_weights(path / "connector.safetensors")
    try:
        model.connector.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(
            f"--init-from {path}: its connector does not fit this model ({str(e).splitlines()[1:2]})"
        ) from e
    log.info("connector initialised from %s", path)


CHANGEABLE_ON_RESUME = frozenset({
    "max_steps", "epochs",  # the run's length: the schedule is rebuilt for it from the restored step
    "data",  # the path: what counts is the data's content, compared by its fingerprint
    "image_root", "init_from", "output", "resume", "save_every", "keep_last", "log_every", "num_workers",
    "trust_remote_code", "grad_checkpointing", "attention", "pad_to_multiple_of", "causal_kernel",
    "no_verify", "max_skipped_steps",  # how a checkpoint is checked on load; when a run of bad steps stops it
    # speed levers: the same micro-batches and losses (each tested equal with the lever on and off)
    "packing", "pack_row_tokens", "feature_cache", "compile", "loss_chunk_size", "prefetch_factor",
})  # fmt: skip
"""Run settings a resumed run may change: its length, where things are, and how (not what) it computes. Every other
setting (learning rates, schedule, accumulation, batch, model, data selection, seed …) is refused by name."""


def check_resumable(cfg: TrainConfig, checkpoint: Path, fingerprint: str) -> None:
    """Refuse to continue a checkpoint under settings that would change the maths, the data or the model.

    `fingerprint` is the current data's `data_fingerprint`; a checkpoint saved with another one was trained on
    other data (another file, or the same file edited).
    """
    config = read_config(checkpoint)
    saved = config.get("run", {})
    current = cfg.to_dict()
    fixed = {k for k in current if k not in CHANGEABLE_ON_RESUME}
    if "data_fingerprint" not in config:  # saved before fingerprints: the path is all there is to compare
        fixed.add("data")
    changed = [
        f"{k}: {saved[k]!r} → {current[k]!r}"
        for k in current
        if k in fixed & set(saved) and saved[k] != current[k]
    ]
    if config.get("data_fingerprint", fingerprint) != fingerprint:
        changed.append(
            f"data contents of {cfg.data} (fingerprint {config['data_fingerprint']} → {fingerprint})"
        )
    if changed:
        raise ValueError(
            f"{checkpoint} was trained with other settings ({'; '.join(changed)}); only --max-steps / --epochs "
            "(and paths, logging, workers, kernels) may change on resume: use another --output, or --resume no to "
            "start over there"
        )
