"""FLOPs of the standard full LLaVA training computation, and this machine's measured matmul peak (for MFU).

Both sides of the bench are charged the same FLOPs per sample, computed here
from the backbone configs and the sample's real token count — never from what
an implementation actually executes. So a side that skips work (a head only at
supervised positions, cached vision features) shows a higher MFU, and the MFU
ratio equals the throughput ratio on the same samples.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

FORMULA = (
    "FLOPs/sample = k·N_llm·T + 12·L·d·T² + 6·N_proj·I·P + I·(2·N_vis·Tv + 4·Lv·dv·Tv²)\n"
    "  k = 6 when the LLM trains (stage 2), 4 when it is frozen (stage 1: forward + input gradients)\n"
    "  T = real tokens of the sample (image tokens included), I = its images, P = visual tokens per image\n"
    "  N_llm = LLM parameters without the input embedding (head included), L, d = its layers and width\n"
    "  12·L·d·T² = attention scores and values over the full T×T square, forward + backward\n"
    "  N_proj = projector parameters (trained, 6 per token); N_vis, Lv, dv, Tv = vision tower parameters\n"
    "  (patch embedding included, position/class embeddings excluded), layers, width, tokens per image\n"
    "  (CLS included): a frozen forward over every layer, as the reference runs it"
)


@dataclass(frozen=True)
class ModelSizes:
    """The numbers the FLOP formula needs, read from the backbone configs."""

    n_llm: int
    llm_layers: int
    llm_width: int
    n_proj: int
    n_vis: int
    vis_layers: int
    vis_width: int
    vis_tokens: int
    """Tokens the vision tower processes per image (CLS included)."""
    image_tokens: int
    """Visual tokens per image in the LLM sequence."""

    def to_dict(self) -> dict:
        return asdict(self)


def model_sizes(vision_dir: str, llm_dir: str) -> ModelSizes:
    """Parameter counts from the configs alone (models built on the meta device, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    vcfg = CLIPVisionConfig.from_pretrained(vision_dir)
    lcfg = AutoConfig.from_pretrained(llm_dir)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(lcfg)
        vis = CLIPVisionModel(vcfg)
    # a tied head is still a head: count every use of a parameter, then drop the input-embedding lookup
    n_llm = (
        sum(p.numel() for _, p in llm.named_parameters(remove_duplicate=False))
        - llm.get_input_embeddings().weight.numel()
    )
    emb = _embeddings(vis)
    n_vis = (
        sum(p.numel() for p in vis.parameters())
        - emb.position_embedding.weight.numel()
        - emb.class_embedding.numel()
    )
    patches = (vcfg.image_size // vcfg.patch_size) ** 2
    dv, dl = vcfg.hidden_size, lcfg.hidden_size
    n_proj = dv * dl + dl + dl * dl + dl  # the mlp2x_gelu projector, with biases
    return ModelSizes(
        n_llm=n_llm,
        llm_layers=lcfg.num_hidden_layers,
        llm_width=dl,
        n_proj=n_proj,
        n_vis=n_vis,
        vis_layers=vcfg.num_hidden_layers,
        vis_width=dv,
        vis_tokens=patches + 1,
        image_tokens=patches,
    )


def _embeddings(vision_model):
    """The embeddings module of a CLIP vision model (nested under `vision_model` in older transformers)."""
    inner = getattr(vision_model, "vision_model", vision_model)
    return inner.embeddings


def sample_flops(sizes: ModelSizes, tokens: int, images: int, llm_trained: bool) -> float:
    """FLOPs of one training sample under the standard full computation (see FORMULA)."""
    s = sizes
    k = 6 if llm_trained else 4
    llm = k * s.n_llm * tokens + 12 * s.llm_layers * s.llm_width * tokens**2
    proj = 6 * s.n_proj * images * s.image_tokens
    vis = images * (2 * s.n_vis * s.vis_tokens + 4 * s.vis_layers * s.vis_width * s.vis_tokens**2)
    return float(llm + proj + vis)


def measure_matmul_peak(dtype: torch.dtype, sizes=(1024, 2048, 4096), seconds: float = 1.0) -> dict:
    """Best sustained square-matmul rate (FLOP/s) on this machine in `dtype`, with the rate at each size."""
    rates = {}
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            a @ b
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            a @ b
            done += 1
        rates[n] = 2 * n**3 * done / elapsed
    return {"peak_flops": max(rates.values()), "by_size": {str(n): r for n, r in rates.items()}}
