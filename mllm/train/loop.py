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

from mllm.checkpoint import latest_checkpoint, read_config, read_weights, verify
from mllm.data.collate import round_up
from mllm.data.recipe import data_fingerprint
from mllm.model import build_model, load_tokenizer, resolve_runtime
from mllm.model.qformer_pretrain import build_qformer_pretrainer, caption_tokenizer
from mllm.model.runtime import training_attention
from mllm.model.trainability import format_parameter_table, parameter_table
from mllm.train import checkpointing, nonfinite, preflight
from mllm.train import distributed as dist
from mllm.train.alignment import AlignmentProbe
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
from mllm.train.policy import check_not_past_end, check_resumable, effective_config, run_model_config
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
    probe: AlignmentProbe | None = None
    """--mir-data: the Modality Integration Rate measured as the run trains (`measure_alignment`)."""


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or continue) the training `cfg` describes; returns the end summary."""
    return fit(setup(cfg))


def setup(cfg: TrainConfig) -> Session:
    """Process group, model, data, DeepSpeed engine; restored from a checkpoint when resuming.

    Each step below takes what the ones before it made; the order matters where a step's docstring says so.
    """
    cfg = effective_config(cfg)  # stage-1 settings inherited, paths absolute, nothing missing
    world, ds_raw = start_processes(cfg)
    resume_from, fingerprint = choose_resume_point(cfg)
    grad_accum = cfg.grad_accum or max(1, cfg.global_batch_size // (cfg.micro_batch_size * world.size))
    model, runtime, tokenizer = setup_model(cfg, world)
    data = build_train_data(cfg, tokenizer, model, world.rank, world.size, progress=world.is_main)
    runtime = setup_kernels(cfg, model, runtime, data, ds_raw)
    total_steps = plan_steps(cfg, model, data, grad_accum, resume_from)
    engine, ds = setup_engine(cfg, model, world, runtime, ds_raw, grad_accum, total_steps, resume_from)
    stream, state = setup_state(cfg, model, engine, world, data, resume_from)
    if world.is_main:
        record_run(cfg, world, runtime, ds, grad_accum, total_steps)
    skips = nonfinite.Skips(cfg.max_skipped_steps)
    fault = nonfinite.Fault.from_env()
    return Session(
        cfg, world, model, engine, data, stream, state, total_steps, grad_accum, fingerprint, skips, fault,
        alignment_probe(cfg, data, tokenizer, model),
    )  # fmt: skip


def alignment_probe(cfg: TrainConfig, data: TrainData, tokenizer, model) -> AlignmentProbe | None:
    """--mir-data's samples (every one read and checked now, before the first step), encoded as the run's own
    data is; None without --mir-data."""
    if not cfg.mir_data:
        return None
    return AlignmentProbe(cfg.mir_data, data.recipe, tokenizer, model, cfg.image_root, cfg.micro_batch_size)


def start_processes(cfg: TrainConfig) -> tuple[dist.World, dict[str, Any]]:
    """Check what can fail early (output writable, DeepSpeed config readable and supported), join the process
    group, quiet every rank but the main one, and prepare the output directory (interrupted saves cleared) before
    any rank looks into it. Returns the world and the DeepSpeed config as read (its "auto" values not filled)."""
    preflight.check_output_writable(Path(cfg.output))  # every rank, before any of them waits for another
    ds_raw = dist.read_ds_config(cfg)
    dist.check_supported(cfg.llm_mode, ds_raw)
    world = dist.init_distributed()
    if not world.is_main:
        logging.getLogger("mllm").setLevel(logging.WARNING)
        transformers.logging.set_verbosity_error()
    if world.is_main:
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        checkpointing.clear_interrupted(Path(cfg.output))
    dist.barrier()
    return world, ds_raw


def choose_resume_point(cfg: TrainConfig) -> tuple[Path | None, str]:
    """The checkpoint this run continues (None: it starts afresh), refused if it was trained under other settings
    or data (`check_resumable`); and the run's data fingerprint, saved in each of its checkpoints."""
    resume_from = checkpointing.find_resume_point(cfg)
    fingerprint = data_fingerprint(train_recipe(cfg))
    if resume_from is not None:
        check_resumable(cfg, resume_from, fingerprint)
    return resume_from, fingerprint


def setup_model(cfg: TrainConfig, world: dist.World):
    """The model on this rank's device, seeded alike on every rank (the same connector initialisation), its
    connector loaded from `--init-from` when given; returns (model, runtime, tokenizer)."""
    transformers.set_seed(cfg.seed)
    mcfg = run_model_config(cfg)
    runtime = resolve_runtime(mcfg.dtype, mcfg.attn_implementation, str(world.device))
    if cfg.stage == 0:  # BLIP-2 representation pretraining: tower + Q-Former + its heads, no LLM
        model = build_qformer_pretrainer(mcfg, runtime)
        model.gather_rows = dist.all_gather_rows  # ITC's in-batch negatives from every process
        tokenizer = caption_tokenizer(model.connector)
    else:
        model = build_model(mcfg, runtime)
        tokenizer = load_tokenizer(mcfg)
    log.info("parameters:\n%s", format_parameter_table(parameter_table(model)))
    if cfg.init_from:
        load_stage1_connector(model, cfg.init_from, verify_hashes=not cfg.no_verify)
    if cfg.grad_checkpointing and cfg.stage > 0:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, runtime, tokenizer


def setup_kernels(cfg: TrainConfig, model, runtime, data: TrainData, ds_raw: dict[str, Any]):
    """How the model computes (not what): the loss's chunking, the attention kernel for this data's lengths, and
    compiled decoder layers when asked. Needs the data (its lengths); returns the runtime as changed."""
    model.loss_chunk_size = cfg.loss_chunk_size or None
    compiled = use_compile(cfg, runtime, ds_raw)
    if cfg.stage > 0:
        runtime = use_training_attention(model, cfg, runtime, data, compiled)
    if compiled:
        compile_decoder_layers(model, data, runtime)
    return runtime


def plan_steps(cfg: TrainConfig, model, data: TrainData, grad_accum: int, resume_from: Path | None) -> int:
    """The run's length in optimizer steps (--max-steps, or --epochs over the data), refused when the checkpoint
    it continues is already past it or when the disk cannot hold the checkpoints it will write."""
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(data.sampler) / grad_accum))
    start_step = checkpointing.saved_step(resume_from) if resume_from is not None else 0
    check_not_past_end(resume_from, start_step, total_steps)
    out = Path(cfg.output)
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
    return total_steps


def setup_engine(
    cfg: TrainConfig,
    model,
    world: dist.World,
    runtime,
    ds_raw: dict[str, Any],
    grad_accum: int,
    total_steps: int,
    resume_from: Path | None,
):
    """The DeepSpeed engine around model, optimizer and schedule; its config's "auto" values filled for this run
    (expecting a universal checkpoint when resuming on another number of processes). Returns (engine, config)."""
    ds = dist.fill_ds_config(
        ds_raw,
        cfg,
        grad_accum,
        world.size,
        runtime.dtype == torch.bfloat16,
        model.width if cfg.stage == 0 else model.llm.config.hidden_size,
    )
    if resume_from is not None and checkpointing.saved_world_size(resume_from) != world.size:
        ds = dist.expect_universal_checkpoint(ds)  # elastic resume: see checkpointing.restore_resharded
    optimizer = dist.make_optimizer(param_groups(model, cfg), ds, cfg.weight_decay)
    engine = dist.initialize(model, optimizer, make_scheduler(optimizer, cfg, total_steps), ds)
    return engine, ds


def setup_state(
    cfg: TrainConfig, model, engine, world: dist.World, data: TrainData, resume_from: Path | None
) -> tuple[BatchStream, dict[str, int]]:
    """The batch stream and the counters (step, samples, tokens, skipped steps): fresh, or restored with engine,
    RNGs and data position from `resume_from`. Seeds each rank apart first (dropout differs per rank, repeats per
    seed), so it comes after every step that must draw alike on all ranks."""
    stream = BatchStream(data)
    state = {"step": 0, "samples": 0, "tokens": 0, "skipped_steps": 0}
    transformers.set_seed(cfg.seed + world.rank)
    if resume_from is not None:
        state.update(checkpointing.restore(engine, world, resume_from, stream))
        # on this run's schedule: --max-steps / --epochs (the run's length) may have changed
        schedule_from(engine.lr_scheduler, state["step"])
        checkpointing.check_finite_weights(model, resume_from)
        log.info("resumed from %s at step %d (epoch %.3f)", resume_from, state["step"], stream.epoch_progress)
    return stream, state


def record_run(
    cfg: TrainConfig, world: dist.World, runtime, ds: dict[str, Any], grad_accum: int, total_steps: int
) -> None:
    """Main rank: write the resolved config beside the checkpoints (run_config.yaml) and log the run's shape."""
    save_yaml(cfg, Path(cfg.output) / RUN_CONFIG_FILE)
    log.info(
        "stage %d: %d steps × %d micro-batches of %d × %d process(es); ZeRO-%d; %s",
        cfg.stage, total_steps, grad_accum, cfg.micro_batch_size, world.size, dist.zero_stage(ds), runtime.describe(),
    )  # fmt: skip


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
    yet: docs/measurements.md)."""
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
        if s.state["step"] == 0:  # (a resumed run measured its start already)
            measure_alignment(s, progress)
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
        record = train_step(
            s.engine, s.stream, s.world, s.grad_accum, state["step"] + 1, s.fault, per_sample=cfg.stage == 0
        )
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
            parts=record["parts"],
        )
        if s.skips.exhausted:  # the same on every rank: stop before anything is saved
            return last_saved, nonfinite.STOPPED
        if state["step"] == s.total_steps or (cfg.mir_every and state["step"] % cfg.mir_every == 0):
            measure_alignment(s, progress)
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


def measure_alignment(s: Session, progress: Progress) -> None:
    """With --mir-data: MIR of the model as it is now, on every rank (ZeRO-3's partitioned weights are gathered
    collectively), recorded by the main rank (mir.jsonl, TensorBoard)."""
    if s.probe is not None:
        progress.alignment(s.state["step"], s.probe.measure(s.model))


def train_step(
    engine,
    stream: BatchStream,
    world: dist.World,
    grad_accum: int,
    step: int,
    fault: nonfinite.Fault | None = None,
    per_sample: bool = False,
) -> dict[str, Any]:
    """Optimizer step `step` over `grad_accum` micro-batches drawn from `stream` (each a collated batch:
    `input_ids` / `labels` [B, T], pixel values or features of its images, `sample_ids`).

    Every micro-batch's summed loss is scaled by world size / the step's supervised tokens on all ranks, so the
    gradient is the mean over every supervised token of the step, however the tokens fall into micro-batches
    (averaging per-batch means would weigh a short sample's tokens more). A non-finite loss on any rank
    discards the step on every rank. Returns the step's loss (per supervised token), samples and tokens (all
    ranks), the sample ids of this rank's micro-batches, and what made the step skip (None: it was applied).
    `fault` is the test hook of `nonfinite.FAULT_ENV`. `per_sample`: the model's loss_sum is per sample (stage 0's
    objectives), not per supervised token; a model's `parts` (stage 0: itc, itm, itg) are normalised alike."""
    batches = [stream.next() for _ in range(grad_accum)]
    counts = [supervised_tokens(b) for b in batches]
    # rows of samples: a skipped bad sample has none, and a blank image row (see BlankImageRow) is no sample
    samples = sum(len(b["sample_lengths"]) for b in batches)
    total_tokens, total_samples = dist.all_reduce_sum([sum(counts), samples], world.device)
    units = total_samples if per_sample else total_tokens
    # DeepSpeed averages gradients over processes; × world size turns that back into a sum over all tokens.
    scale = world.size / max(units, 1.0)
    loss_sum, discard, parts = 0.0, False, {}
    # (a micro-batch whose samples were all bad is a blank row alone: a pass that learns nothing)
    for i, batch in enumerate(batches):
        out = engine(**model_inputs(batch, world.device))
        for name, value in (getattr(out, "parts", None) or {}).items():
            parts[name] = parts.get(name, 0.0) + float(value.detach())
        loss = fault.apply(out.loss_sum, step, world.rank) if fault else out.loss_sum
        loss_sum += float(loss.detach())
        if i == len(batches) - 1:  # a non-finite loss on any rank discards the step on every rank
            discard = dist.any_rank(not math.isfinite(loss_sum), world.device)
        dist.backward(engine, loss * scale, discard=discard)
        dist.step(engine)
    global_loss_sum, not_applied, *part_sums = dist.all_reduce_sum(
        [loss_sum, float(not dist.step_applied(engine)), *parts.values()], world.device
    )
    return {
        "loss": global_loss_sum / max(units, 1.0),
        "parts": {name: v / max(units, 1.0) for name, v in zip(parts, part_sums, strict=True)},
        "samples": int(total_samples),
        "tokens": int(total_tokens),
        "sample_ids": [list(b["sample_ids"]) for b in batches],
        "skipped": nonfinite.skip_reason(discard, not_applied > 0),
    }


def signal_name(signum: int | None) -> str:
    """The signal's name; a rank stopping because a peer was signalled has none of its own: SIGTERM."""
    return signal.Signals(signum).name if signum else "SIGTERM"


# ---- stage 2 from stage 1 ---------------------------------------------------------------------------
def load_stage1_connector(model, init_from: str, verify_hashes: bool = True) -> None:
    """Load the connector of the checkpoint `init_from` into `model` (hash-checked unless told not to, every tensor
    finite): a stage-1 connector whole, or a stage-0 Q-Former, whose projection into the LLM starts new (it had no
    LLM)."""
    saved = read_config(init_from)
    path = Path(saved["_path"])
    if verify_hashes:
        verify(path, hashed=["connector.safetensors"])
    weights = read_weights(path / "connector.safetensors")
    from_stage0 = saved.get("stage") == 0
    try:
        missing, unexpected = model.connector.load_state_dict(weights, strict=not from_stage0)
    except RuntimeError as e:
        raise ValueError(
            f"--init-from {path}: its connector does not fit this model ({str(e).splitlines()[1:2]})"
        ) from e
    not_new = [k for k in missing if not k.startswith("proj.")]
    if unexpected or not_new:
        raise ValueError(
            f"--init-from {path}: its Q-Former does not fit this model (unexpected {unexpected[:3]}, missing "
            f"{not_new[:3]})"
        )
    log.info("connector initialised from %s%s", path, " (stage-0 Q-Former; LLM projection new)" * from_stage0)
