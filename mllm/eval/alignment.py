"""`mllm eval --task alignment`: the Modality Integration Rate (MIR) of a checkpoint, any connector.

The measurement is `mllm.model.alignment` (what MIR is, and how); here each item (an image and its reference answer)
becomes a batch through the checkpoint's own processor.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from mllm.eval.data import EvalItem
from mllm.model.alignment import modality_integration_rate


@torch.no_grad()
def alignment_scores(
    model, processor, items: list[EvalItem], batch_size: int = 16, progress: bool = True
) -> dict:
    """A `MultimodalLM` + its processor and items with images → {"mir", "per_layer", "n_visual", "n_text"}."""
    from mllm.data.images import open_image
    from mllm.inference.generate import batched
    from mllm.inference.processor import Conversation

    device = next(model.connector.parameters()).device

    def batches():
        for chunk in tqdm(
            list(batched(items, batch_size)), desc="alignment", unit="batch", disable=not progress
        ):
            convs = []
            for it in chunk:
                images = [open_image(ref, it.image_root, it.max_image_pixels) for ref in it.images]
                convs.append(
                    Conversation([*it.messages, {"role": "assistant", "content": it.reference}], images)
                )
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in processor(convs).items()}

    return modality_integration_rate(model, batches())


def format_alignment(scores: dict) -> str:
    layers = " ".join(f"{d:.2f}" for d in scores["per_layer"])
    return (
        f"Modality Integration Rate (MIR, lower = visual tokens closer to text): {scores['mir']:.3f}\n"
        f"  over {scores['n_visual']} visual and {scores['n_text']} text tokens; per-layer distance: {layers}"
    )
