"""What a run takes from elsewhere, and what a resumed run may change: policy beside the run config.

- inheritance: a stage-2 run started `--init-from` a stage-1 checkpoint takes that run's vision tower and connector
  settings (and its LLM, unless given), and builds the connector exactly as it was saved;
- resume: a run continuing a checkpoint may change its length, paths and how (not what) it computes; anything
  else, and other data contents, is refused by name.

Everything here reads configs and checkpoint metadata only; no model, no process group.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mllm.checkpoint import QFORMER_TOKENIZER_DIR, read_config
from mllm.config import ConnectorConfig, ModelConfig
from mllm.train.config import TrainConfig


def effective_config(cfg: TrainConfig) -> TrainConfig:
    """The config a run uses: stage-1 settings filled in from `--init-from`, local paths absolute, nothing the run
    needs left empty (ValueError naming what is missing)."""
    cfg = absolute_paths(fill_from_init(cfg))
    cfg.check_complete()
    return cfg


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute, so that checkpoints and run_config.yaml work from any directory (hub ids stay)."""
    values = cfg.to_dict()
    for key in (
        "vision",
        "llm",
        "data",
        "image_root",
        "output",
        "zero",
        "init_from",
        "feature_cache",
        "mir_data",
    ):
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
        qformer_cross_attention_frequency=saved.connector.cross_attention_frequency,
        llm=cfg.llm or saved.llm.path,
    )
    return TrainConfig(**values)


def run_model_config(cfg: TrainConfig) -> ModelConfig:
    """The `ModelConfig` the run builds: `cfg.model_config()`, with the connector of `--init-from` when given."""
    mcfg = cfg.model_config()
    if cfg.init_from:
        mcfg.connector = stage1_connector_config(cfg)
    return mcfg


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


# ---- resuming ---------------------------------------------------------------------------------------
CHANGEABLE_ON_RESUME = frozenset({
    "max_steps", "epochs",  # the run's length: the schedule is rebuilt for it from the restored step
    "data",  # the path: what counts is the data's content, compared by its fingerprint
    "image_root", "init_from", "output", "resume", "save_every", "keep_last", "log_every", "num_workers",
    "trust_remote_code", "grad_checkpointing", "attention", "pad_to_multiple_of", "causal_kernel",
    "no_verify", "max_skipped_steps",  # how a checkpoint is checked on load; when a run of bad steps stops it
    "mir_data", "mir_every",  # a diagnostic, measured beside the training
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


def check_not_past_end(checkpoint: Path | None, start_step: int, total_steps: int) -> None:
    """Refuse to resume a checkpoint saved at `start_step` when this run is only `total_steps` long."""
    if checkpoint is not None and start_step > total_steps:
        raise ValueError(
            f"{checkpoint} is at step {start_step}, past this run's {total_steps} steps: raise --max-steps or "
            "--epochs to continue it"
        )
