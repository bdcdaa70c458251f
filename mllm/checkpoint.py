"""Self-contained checkpoints: trainable weights (safetensors) + the config that says what the model is.

Layout of a checkpoint directory::

    mllm_config.json        format version, ModelConfig, template and run settings
    connector.safetensors   always
    adapter/                LoRA / QLoRA adapters (peft layout), when the LLM was adapted
    llm.safetensors         full LLM weights, when the LLM was trained in full
    vision.safetensors      when the vision tower was trained
    qformer_tokenizer/      the text-aware Q-Former's own tokenizer, when it has one
    COMPLETE                written last: the manifest of every file, its size and its xxh3-128 hash

A directory is written under a temporary name and renamed into place only
after COMPLETE is on disk, so a crash mid-save never leaves a checkpoint that
looks complete. `load_model_and_config` verifies the manifest: the size of every
file, and the hash of every weight file it reads (a same-size corruption, a
flipped byte, is caught and the file named); every tensor it loads must be
finite. Hashing is xxh3-128 (xxhash): not cryptographic, which is not the
point here (whoever can rewrite a weight file can rewrite the manifest), but
several GB/s, faster than the disk it reads from.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
import xxhash
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from mllm.config import FORMAT_VERSION, ModelConfig
from mllm.connectors import CONNECTORS
from mllm.model import build_model, resolve_runtime
from mllm.vision import VISION_TOWERS

log = logging.getLogger(__name__)

CONFIG_FILE = "mllm_config.json"
COMPLETE_FILE = "COMPLETE"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
DISCARD_PREFIX = ".deleting-"
"""A checkpoint being deleted is renamed to this prefix first; leftovers are removed when a run starts."""
_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")


HASH = "xxh3_128"
"""The content hash recorded in COMPLETE beside each file's size."""
WEIGHT_FILES = (
    "connector.safetensors",
    "vision.safetensors",
    "llm.safetensors",
    "adapter/adapter_model.safetensors",
)
"""The weight files a checkpoint may hold (relative paths), those `load_model_and_config` reads."""
_CHUNK = 8 * 2**20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the directory or file and what is wrong."""


def file_hash(path: str | os.PathLike) -> str:
    """The xxh3-128 hex digest of a file's bytes, read in 8 MiB chunks."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in `tensors` holding a NaN or an infinity."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite(tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Raise `CheckpointError` naming `source` (the file) and the first tensor that holds a NaN or an infinity."""
    bad = nonfinite_tensors(tensors)
    if bad:
        t = tensors[bad[0]]
        raise CheckpointError(
            f"{source}: tensor {bad[0]!r} holds {int((~torch.isfinite(t)).sum())} non-finite value(s) (NaN/Inf)"
            + (f", and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else "")
            + "; these weights are unusable: load an earlier checkpoint"
        )


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """One safetensors file → its tensors, every one checked finite (`CheckpointError` naming file and tensor)."""
    tensors = load_file(str(path))
    check_finite(tensors, path)
    return tensors


def trainable_state_dicts(model) -> dict[str, dict[str, torch.Tensor]]:
    """The weights a checkpoint stores, per component, as contiguous CPU tensors.

    Under ZeRO-3 call this inside `deepspeed.zero.GatheredParameters` over the trainable parameters.
    """
    cfg = model.config
    out = {"connector": _cpu(model.connector.state_dict())}
    heads = getattr(model, "heads", None)  # a stage-0 Q-Former pretrainer's ITC / ITM / LM heads
    if heads is not None:
        out["qformer_heads"] = _cpu(heads.state_dict())
    if cfg.vision.trainable == "full":
        out["vision"] = _cpu(model.vision.state_dict())
    if cfg.llm.mode in ("lora", "qlora"):
        out["adapter"] = _cpu(get_peft_model_state_dict(model.llm))
    elif cfg.llm.mode == "full":
        out["llm"] = _cpu(model.llm.state_dict())
    return out


def _cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def write_model_files(
    directory: str | os.PathLike,
    model_config: ModelConfig,
    weights: dict[str, dict[str, torch.Tensor]],
    meta: dict[str, Any] | None = None,
    adapter_config=None,
    connector_tokenizer=None,
) -> None:
    """Write the weights and config of a checkpoint into `directory` (no COMPLETE marker yet).

    `connector_tokenizer`: the connector's own tokenizer (a text-aware Q-Former's), saved beside its weights.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for component, sd in weights.items():
        empty = [k for k, v in sd.items() if v.numel() == 0]
        if empty:
            raise CheckpointError(
                f"refusing to save empty tensors for {component}: {empty[:3]} (ZeRO-3 not gathered?)"
            )
        if component == "adapter":
            (d / "adapter").mkdir(exist_ok=True)
            save_file(sd, str(d / "adapter" / "adapter_model.safetensors"))
            if adapter_config is not None:
                adapter_config.save_pretrained(str(d / "adapter"))
        else:
            save_file(sd, str(d / f"{component}.safetensors"))
    if connector_tokenizer is not None:
        connector_tokenizer.save_pretrained(str(d / QFORMER_TOKENIZER_DIR))
    config = {"format_version": FORMAT_VERSION, "model": model_config.to_dict(), **(meta or {})}
    (d / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))


def mark_complete(directory: str | os.PathLike) -> None:
    """Flush every file to disk, hash it, then write the manifest last, fsynced: from here on the directory is a
    usable checkpoint (also after a power loss, not only after a crash of the process).

    The hash is taken as the save ends, of the bytes just written (still in the page cache: no disk read).
    """
    d = Path(directory)
    manifest = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != COMPLETE_FILE:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            manifest[str(p.relative_to(d))] = {"size": p.stat().st_size, HASH: file_hash(p)}
    tmp = d / (COMPLETE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"hash": HASH, "files": manifest}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / COMPLETE_FILE)


def verify(directory: str | os.PathLike, hashed: Iterable[str] | Literal["all"] = ()) -> None:
    """Raise `CheckpointError` unless `directory` has a COMPLETE manifest that matches its files.

    Every file's size is checked (cheap); the content hash only of the files named in `hashed` (paths relative
    to `directory`; "all" = every file). A manifest written before hashes were recorded has sizes only.
    """
    d = Path(directory)
    marker = d / COMPLETE_FILE
    if not marker.is_file():
        raise CheckpointError(f"{d}: no {COMPLETE_FILE} marker (an interrupted save?)")
    try:
        manifest = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{d}: unreadable {COMPLETE_FILE} manifest ({e})") from e
    for rel, entry in manifest.items():
        size = entry["size"] if isinstance(entry, dict) else entry
        p = d / rel
        if not p.is_file() or p.stat().st_size != size:
            raise CheckpointError(f"{d}: {rel} is missing or has the wrong size (damaged checkpoint)")
    for rel in manifest if hashed == "all" else hashed:
        entry = manifest.get(rel)
        if not isinstance(entry, dict) or HASH not in entry:
            continue  # not in the manifest, or a manifest from before hashes: sizes were all it could check
        if file_hash(d / rel) != entry[HASH]:
            raise CheckpointError(
                f"{d / rel}: its content differs from the {HASH} hash recorded when it was saved (damaged on "
                "disk or edited since); use an earlier checkpoint, or pass --no-verify to load it anyway"
            )


def publish(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Atomically move a completed temporary checkpoint directory to its final name (replacing an older one)."""
    final = Path(final_dir)
    if final.exists():
        discard(final)
    os.replace(tmp_dir, final)
    _fsync_dir(final.parent)


def discard(path: str | os.PathLike) -> None:
    """Delete a checkpoint directory so that no crash leaves it half-deleted under its own name: it is renamed
    out of the `checkpoint-N` namespace first (atomic), then removed."""
    p = Path(path)
    doomed = p.with_name(f"{DISCARD_PREFIX}{p.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(p, doomed)
    _fsync_dir(p.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `checkpoint-N` folder in `output_dir`, oldest first (complete or not)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(
    output_dir: str | os.PathLike, hashed: Iterable[str] | Literal["all"] = ()
) -> Path | None:
    """The newest complete checkpoint; a damaged newer one is skipped with a warning. `hashed`: as in `verify`."""
    for _step, path in reversed(list_checkpoints(output_dir)):
        try:
            verify(path, hashed)
            return path
        except CheckpointError as e:
            log.warning("skipping damaged checkpoint %s: %s; falling back to an older one", path, e)
    return None


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    d = Path(path)
    if not d.exists():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    if not (d / CONFIG_FILE).is_file():
        newest = latest_checkpoint(d)
        if newest is None:
            raise CheckpointError(
                f"{d}: not an mllm checkpoint (no {CONFIG_FILE}) and holds no complete checkpoint-N"
            )
        d = newest
    verify(d)
    config = json.loads((d / CONFIG_FILE).read_text())
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{d}: checkpoint format version {version!r}; this mllm reads version {FORMAT_VERSION}"
        )
    config["_path"] = str(d)
    return config


def load_model_and_config(
    path: str | os.PathLike,
    dtype: str | None = None,
    device: str | None = None,
    load_4bit: bool = False,
    full_precision_base: bool = False,
    trust_remote_code: bool = False,
    verify_hashes: bool = True,
):
    """Load a checkpoint (or an output directory: its newest complete checkpoint) for inference.

    Returns `(model, config)`: the `MultimodalLM` in eval mode with its trained weights, and the saved config
    dict (template, run settings). Needs no DeepSpeed. `full_precision_base` puts a QLoRA checkpoint's
    adapters on the unquantised base (its `model.config.llm.mode` is then `lora`), e.g. to merge them.
    `trust_remote_code` is the caller's decision alone: a checkpoint's own config cannot switch it on.
    The weight files read are checked against their recorded hashes (`verify_hashes=False` skips that, the
    `--no-verify` of the commands), and every tensor loaded must be finite: else a `CheckpointError` names the
    file (and the tensor).
    """
    config = read_config(path)
    d = Path(config["_path"])
    weight_files = [rel for rel in WEIGHT_FILES if (d / rel).is_file()]
    if verify_hashes:
        verify(d, hashed=weight_files)
    weights = {rel.split("/")[0].removesuffix(".safetensors"): read_weights(d / rel) for rel in weight_files}
    mcfg = ModelConfig.from_dict(config["model"])
    mcfg.llm.trust_remote_code = trust_remote_code
    for what, registry, name in (
        ("connector", CONNECTORS, mcfg.connector.kind),
        ("vision tower", VISION_TOWERS, mcfg.vision.kind),
    ):
        if name not in registry:
            raise CheckpointError(f"{d}: unknown {what} {name!r} in {CONFIG_FILE}; known: {registry.names()}")
    # The Q-Former's sizes are saved explicit and its weights are in connector.safetensors: no BERT needed.
    mcfg.connector.qformer_init = ""
    if (d / QFORMER_TOKENIZER_DIR).is_dir():
        mcfg.connector.qformer_tokenizer = str(d / QFORMER_TOKENIZER_DIR)
    if dtype:
        mcfg.dtype = dtype
    trained_mode = mcfg.llm.mode
    if load_4bit and trained_mode == "full":
        raise CheckpointError(
            f"{d}: --load-4bit needs the LLM's base weights from its own directory, but this checkpoint trained the "
            "whole LLM; load it in bf16/fp32 instead"
        )
    if load_4bit and trained_mode == "lora":
        mcfg.llm.mode = "qlora"
    if full_precision_base and trained_mode == "qlora":
        mcfg.llm.mode = "lora"
    runtime = resolve_runtime(mcfg.dtype, mcfg.attn_implementation, device)
    model = build_model(mcfg, runtime, trainable=trained_mode in ("lora", "qlora"), load_4bit=load_4bit)
    model.connector.load_state_dict(weights["connector"])
    if "vision" in weights:
        model.vision.load_state_dict(weights["vision"])
    if "llm" in weights:
        model.llm.load_state_dict(weights["llm"])
    if "adapter" in weights:
        result = set_peft_model_state_dict(model.llm, weights["adapter"])
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{d}: adapter weights do not fit the LLM: {result.unexpected_keys[:3]}")
    model.to(runtime.device)
    model.requires_grad_(False)
    model.eval()
    return model, config
