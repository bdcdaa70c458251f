"""The one module that knows DeepSpeed: process group, engine, ZeRO-3 gathering, engine checkpoints.

Runs under the `deepspeed` launcher (one or many processes, NCCL on GPUs,
gloo on CPUs) and as a plain `python script.py`: without launcher variables
it becomes a one-process group on a free local port.
"""

from __future__ import annotations

# `deepspeed` is imported inside the functions that use it: its import costs seconds (and prints), and the
# modules that import this one for its plain helpers never need it.
import argparse
import contextlib
import copy
import fcntl
import json
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm.train.config import TrainConfig

ENGINE_TAG = "engine"
"""Sub-folder of a checkpoint holding DeepSpeed's own files (optimizer, scheduler, ZeRO partitions)."""

DEFAULT_DS_CONFIG: dict[str, Any] = {
    "zero_optimization": {"stage": 2},
}
"""Used when the run names no --zero file."""


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> World:
    """Join the launcher's process group, or form a one-process group when started without a launcher."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        # DeepSpeed (and ZeRO-3's Init) read these torchrun-style variables; a lone process sets its own.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        load_deepspeed_op("ShareMemCommBuilder")  # what init_distributed would build, but kill-safe
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
    device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")
    world = World(
        rank=torch.distributed.get_rank(),
        local_rank=local_rank,
        size=torch.distributed.get_world_size(),
        device=device,
    )
    if device.type == "cpu":
        release_shm_names(world.rank)
        share_cpu_threads(os.environ)
    return world


def cpu_threads_per_rank(env: dict[str, str] | os._Environ, cpus: int) -> int | None:
    """The intra-op threads each of this node's ranks gets on a CPU run: its share of `cpus`, or None (torch's
    default) when OMP_NUM_THREADS is set or one rank has the node. torchrun does the same (it sets
    OMP_NUM_THREADS=1); without it N ranks each start `cpus` threads and oversubscribe the cores."""
    local = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 1)
    if "OMP_NUM_THREADS" in env or local <= 1:
        return None
    return max(1, cpus // local)


def share_cpu_threads(env: dict[str, str] | os._Environ) -> None:
    threads = cpu_threads_per_rank(env, len(os.sched_getaffinity(0)))
    if threads is not None:
        torch.set_num_threads(threads)


SHM_BUFFER_PREFIX = "/dev/shm/deepspeed_allreduce_buffer"


def shm_buffer_path(rank: int) -> str:
    """Where DeepSpeed's CPU shared-memory all-reduce keeps `rank`'s workspace for this process group."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"{SHM_BUFFER_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_names(rank: int) -> None:
    """Unlink this rank's shared-memory all-reduce segment once every rank has mapped it.

    DeepSpeed's CPU backend creates one ~70 MB /dev/shm segment per rank and never unlinks it, so each run
    (and each crash) left RAM-backed files behind until reboot. After the barrier every rank has mapped its
    peers' segments (its initialisation waits for that), and a mapping outlives its name.
    """
    torch.distributed.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shm_buffer_path(rank))


def load_deepspeed_op(builder_name: str) -> None:
    """Load one of DeepSpeed's just-in-time-built ops into this process (DeepSpeed then reuses it), safely.

    torch guards each extension's build folder with a plain lock file that every loading process holds for a
    moment (while ninja checks the build). A process killed in that moment (SIGKILL, the OOM killer, a node
    going away) leaves the file behind, and every later run waits on it forever, silently. mllm loads under
    an OS lock that dies with its holder instead: holding it, a leftover lock file can only be stale.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from torch.utils import cpp_extension

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # DeepSpeed falls back without it, as it would on its own
    build_dir = Path(cpp_extension._get_build_directory(builder.name, verbose=False))
    with open(build_dir.parent / f"{builder.name}.mllm-lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            print(f"removing {stale}: left by a process killed while loading {builder.name}", flush=True)
            stale.unlink(missing_ok=True)
        if not (build_dir / f"{builder.name}.so").exists():
            print(
                f"building DeepSpeed's {builder.name} op (first run on this machine only, about a minute)",
                flush=True,
            )
        builder.load(verbose=False)


def quiet_library_deprecations() -> None:
    """For entry points only: ZeRO-3 calls torch.distributed functions that warn on every call, i.e. every step."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def read_ds_config(cfg: TrainConfig) -> dict[str, Any]:
    if not cfg.zero:
        return copy.deepcopy(DEFAULT_DS_CONFIG)
    path = Path(cfg.zero)
    if not path.is_file():
        raise FileNotFoundError(
            f"--zero {path}: no such DeepSpeed config (see zero_configs/z2.json, z3.json, z3_offload.json)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--zero {path}: not valid JSON (line {e.lineno}: {e.msg})") from e


def fill_ds_config(
    ds: dict[str, Any], cfg: TrainConfig, grad_accum: int, world_size: int, bf16: bool, hidden_size: int
) -> dict[str, Any]:
    """Replace every "auto" in a DeepSpeed config with the value the run config implies (or fail naming it)."""
    ds = copy.deepcopy(ds)
    auto = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": cfg.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "bf16.enabled": bf16,
        "fp16.enabled": False,
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in auto.items():
        section, _, name = key.rpartition(".")
        holder = ds.setdefault(section, {}) if section else ds
        if holder.get(name, "auto") == "auto":
            holder[name] = value
        elif (
            key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
            and holder[name] != value
        ):
            raise ValueError(
                f'--zero config sets {key}={holder[name]} but the run needs {value}; write "auto" there'
            )
    left = _find_auto(ds)
    if left:
        raise ValueError(f'--zero config: no value for "auto" at {left}; set it explicitly')
    if ds.get("fp16", {}).get("enabled"):
        raise ValueError("--zero config enables fp16; use --dtype bf16 or fp32 (fp16 needs loss scaling)")
    if ds["bf16"]["enabled"] != bf16:
        raise ValueError(
            f"--zero config sets bf16.enabled={ds['bf16']['enabled']} but the run's dtype is {'bf16' if bf16 else 'fp32'}"
        )
    ds.setdefault("steps_per_print", 10**9)  # our loop logs; DeepSpeed's own step prints are noise
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def check_supported(llm_mode: str, ds: dict[str, Any]) -> None:
    """Refuse combinations DeepSpeed cannot run, before any model is loaded."""
    if llm_mode == "qlora" and zero_stage(ds) == 3:
        raise ValueError(
            "--llm-mode qlora cannot run under ZeRO-3: it would partition the packed 4-bit bitsandbytes weights. "
            "Use --zero zero_configs/z2.json (the 4-bit base is small; ZeRO-2 shards the adapters' optimizer state)"
        )


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in (
        "none",
        None,
    )


def make_optimizer(
    param_groups: list[dict[str, Any]], ds: dict[str, Any], weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW. With the optimizer offloaded from a GPU, DeepSpeed's CPU Adam (built on first use) keeps the
    offloaded step fast; on a CPU-only machine torch's AdamW already runs where the states live."""
    from deepspeed.accelerator import get_accelerator

    if offloads_optimizer(ds) and get_accelerator().device_name() != "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        load_deepspeed_op("CPUAdamBuilder")

        return DeepSpeedCPUAdam(param_groups, weight_decay=weight_decay, adamw_mode=True)
    if offloads_optimizer(ds):
        ds["zero_force_ds_cpu_optimizer"] = False
    return torch.optim.AdamW(param_groups, weight_decay=weight_decay)


def initialize(model: nn.Module, optimizer, scheduler, ds: dict[str, Any]):
    """Wrap the model in a DeepSpeed engine; DeepSpeed steps the optimizer and scheduler at accumulation boundaries."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds
    )
    return engine


def backward(engine, loss: torch.Tensor, discard: bool = False) -> None:
    """Back-propagate `loss`; `discard=True` (on the last micro-batch of a step) makes the step a no-op.

    DeepSpeed's ZeRO optimizers (stages 1-3) discard a step whose global gradient norm is not finite: gradients
    zeroed, no parameter, optimizer-state or lr-scheduler change, `engine.skipped_steps` + 1, micro-step
    counters as after any step (the path fp16 loss scaling takes on an overflow). A non-finite gradient already
    goes there; to discard a step whose loss is non-finite but whose gradient is not, its gradient is made NaN.
    `step_applied` tells afterwards whether the step was discarded.
    """
    if discard:
        loss = loss * float("nan")
    # Our loss is already normalised by the tokens of the whole accumulated batch: no extra 1/grad_accum.
    engine.backward(loss, scale_wrt_gas=False)


def step(engine) -> None:
    engine.step()


def step_applied(engine) -> bool:
    """Whether the optimizer step that just ended changed the weights (False: discarded as non-finite)."""
    return engine.was_step_applied()


def grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum numbers over all processes (supervised-token counts, loss sums)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def all_gather_rows(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's rows of `local` [R_rank, ...], concatenated in rank order, and where this rank's start.

    Ranks may hold different numbers of rows (a short last micro-batch). The other ranks' rows arrive without
    gradient; this rank's own rows are `local` itself, so the gradient flows through them (contrastive in-batch
    negatives: each rank back-propagates through its own side of every pair).
    """
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return local, 0
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    count = torch.tensor([local.shape[0]], dtype=torch.long, device=local.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: local.shape[0]] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    rows = [part[:n] for part, n in zip(parts, sizes, strict=True)]
    rows[rank] = local
    return torch.cat(rows), sum(sizes[:rank])


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every process if `flag` is true on any of them."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextlib.contextmanager
def gathered(params: list[nn.Parameter]):
    """Full values of ZeRO-3-partitioned parameters on every rank for the duration (no-op below ZeRO-3)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


@contextlib.contextmanager
def gathered_for_update(params: list[nn.Parameter]):
    """Gather ZeRO-3 parameters so that rank 0 may overwrite them; the change is re-partitioned on exit."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        yield


def save_engine_state(engine, checkpoint_dir: Path) -> None:
    """Optimizer, scheduler and ZeRO partitions of every rank into `checkpoint_dir/engine` (collective call)."""
    engine.save_checkpoint(
        str(checkpoint_dir), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True
    )


def expect_universal_checkpoint(ds: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config of an engine that will load a universal checkpoint (see `make_universal`)."""
    ds = copy.deepcopy(ds)
    ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def make_universal(checkpoint_dir: Path, into: Path) -> None:
    """Convert `checkpoint_dir/engine`, partitioned for the world size that wrote it, into DeepSpeed's universal
    checkpoint `into/engine`: per parameter its fp32 value and Adam moments, whole, loadable by any number of
    processes (an engine made with `expect_universal_checkpoint`). One process runs it, the others wait."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(checkpoint_dir / ENGINE_TAG),
        output_folder=str(into / ENGINE_TAG),
        num_extract_workers=1,  # in this process: no worker pool to spawn
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our engines record no Megatron-style parallelism info: there is none
    )
    with contextlib.redirect_stdout(None):  # its progress lines; errors still raise
        ds_to_universal.main(args)


def load_engine_state(engine, checkpoint_dir: Path) -> None:
    """Restore what `save_engine_state` wrote; the frozen backbones come from their own files, not from here."""
    path, _ = engine.load_checkpoint(
        str(checkpoint_dir),
        tag=ENGINE_TAG,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise RuntimeError(f"{checkpoint_dir}: DeepSpeed found no engine state under {ENGINE_TAG}/")
