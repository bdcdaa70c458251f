"""Training data: recipes, source formats, chat templates with exact assistant-only labels, batching.

recipe = load_recipe("data_recipes/llava_v1_5_finetune.yaml")
ds = build_dataset(recipe, tokenizer, image_tokens=model.num_image_tokens, preprocess=model.vision.preprocess)
sampler = MixtureBatchSampler(ds, micro_batch_size=4, seed=0, rank=rank, world_size=world)
loader = DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(tokenizer.pad_token_id))
"""

from __future__ import annotations

from mllm.config import IGNORE_INDEX
from mllm.data.collate import Collator, pack_rows
from mllm.data.dataset import MultimodalDataset, build_dataset
from mllm.data.encode import ConversationEncoder, encode_conversation
from mllm.data.errors import BadSampleError
from mllm.data.packing import PackingCollator, causal_block_mask
from mllm.data.recipe import Recipe, SourceSpec, load_recipe
from mllm.data.sampler import MixtureBatchSampler
from mllm.data.templates import TEMPLATES

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "BadSampleError",
    "Collator",
    "ConversationEncoder",
    "MixtureBatchSampler",
    "MultimodalDataset",
    "PackingCollator",
    "Recipe",
    "SourceSpec",
    "build_dataset",
    "causal_block_mask",
    "encode_conversation",
    "load_recipe",
    "pack_rows",
]
