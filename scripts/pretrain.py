"""Stage 1: align the connector on image-caption data (vision tower and LLM frozen).

    deepspeed --num_gpus 8 scripts/pretrain.py --zero zero_configs/z2.json \
        --vision VISION --llm LLM --data data_recipes/llava_pretrain.yaml --output runs/stage1
    python scripts/pretrain.py --config my_stage1.yaml        # one process, no launcher
"""

import sys

from mllm.train.script import main

if __name__ == "__main__":
    sys.exit(main(stage=1, description=__doc__))
