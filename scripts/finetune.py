"""Stage 2: instruction-tune connector + LLM (full, lora or qlora), starting from a stage-1 connector.

    deepspeed --num_gpus 8 scripts/finetune.py --zero zero_configs/z3.json --init-from runs/stage1 \
        --llm-mode lora --data data_recipes/llava_v1_5_finetune.yaml --output runs/stage2
    python scripts/finetune.py --config my_stage2.yaml        # one process, no launcher
"""

import sys

from mllm.train.script import main

if __name__ == "__main__":
    sys.exit(main(stage=2, description=__doc__))
