"""Write real HF-format backbone directories with random weights, for offline tests and demos.

Each directory holds a config, safetensors weights and a tokenizer or image
processor, and loads with the same `from_pretrained` call a hub id takes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import transformers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from mllm.testing.tokenizers import make_tokenizer

LLM_FAMILIES = ("llama", "qwen2", "gpt2", "phi3")
VISION_FAMILIES = ("clip", "siglip")


@dataclass
class TinySize:
    """Sizes of the generated backbones (default: tiny, for tests in seconds)."""

    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    vocab: int = 1024
    vision_hidden: int = 48
    vision_layers: int = 3
    vision_heads: int = 4
    image_size: int = 32
    patch_size: int = 8


def _llm_config(family: str, size: TinySize, vocab: int, tok, tie: bool | None = None):
    common = dict(
        vocab_size=vocab,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=size.llm_hidden, n_layer=size.llm_layers, n_head=size.llm_heads, n_positions=2048, **common
        )
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "phi3": transformers.Phi3Config,
    }[family]
    return cls(
        hidden_size=size.llm_hidden,
        intermediate_size=2 * size.llm_hidden,
        num_hidden_layers=size.llm_layers,
        num_attention_heads=size.llm_heads,
        num_key_value_heads=size.llm_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=family != "phi3" if tie is None else tie,
        **common,
    )


def make_llm(
    family: str,
    out: str,
    size: TinySize | None = None,
    seed: int = 0,
    image_token: str | None = None,
    tie_word_embeddings: bool | None = None,
) -> str:
    """Write a tiny causal LM of `family` (llama, qwen2, gpt2, phi3) with its tokenizer to `out`; `image_token`:
    a special token added to the vocabulary (as LLaVA's own LLMs carry <image>); `tie_word_embeddings`: None is
    the family's usual choice."""
    size = size or TinySize()
    tok = make_tokenizer(family, size.vocab)
    if image_token:
        tok.add_special_tokens({"additional_special_tokens": [image_token]})
    config = _llm_config(family, size, len(tok), tok, tie_word_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_vision(family: str, out: str, size: TinySize | None = None, seed: int = 0) -> str:
    """Write a tiny vision tower of `family` (clip, siglip) with its image processor to `out`."""
    size = size or TinySize()
    common = dict(
        hidden_size=size.vision_hidden,
        intermediate_size=2 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "clip":
            model = CLIPVisionModel(CLIPVisionConfig(projection_dim=size.vision_hidden, **common))
            proc = CLIPImageProcessor(
                size={"shortest_edge": size.image_size},
                crop_size={"height": size.image_size, "width": size.image_size},
            )
        elif family == "siglip":
            model = SiglipVisionModel(SiglipVisionConfig(**common))
            proc = SiglipImageProcessor(size={"height": size.image_size, "width": size.image_size})
        else:
            raise KeyError(f"unknown vision family {family!r}; known: {VISION_FAMILIES}")
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def make_all(
    out: str, size: TinySize | None = None, llms=LLM_FAMILIES, visions=VISION_FAMILIES
) -> dict[str, str]:
    """Write every family under `out/`; returns {name: directory}."""
    paths = {}
    for fam in visions:
        paths[fam] = make_vision(fam, os.path.join(out, f"vision-{fam}"), size)
    for fam in llms:
        paths[fam] = make_llm(fam, os.path.join(out, f"llm-{fam}"), size)
    return paths


_BERT_WORDS = (
    "a an the is it this in on of what which shape color colour there image photo picture red blue green yellow "
    "gray black white circle square triangle rectangle yes no how many describe"
).split()


def make_bert(out: str, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0) -> str:
    """Write a tiny random BERT (uncased WordPiece tokenizer over a few words) to `out`: a Q-Former init."""
    os.makedirs(out, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_BERT_WORDS, *"abcdefghijklmnopqrstuvwxyz?.,"]
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.BertModel(config)
        with torch.no_grad():  # nonzero token-type embeddings, so a mapping that drops them shows
            model.embeddings.token_type_embeddings.weight.normal_(0, 0.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_blip2(out: str, llm_dir: str, qformer_tokenizer_dir: str | None = None, seed: int = 0) -> str:
    """Write a tiny random transformers BLIP-2 (or, with `qformer_tokenizer_dir`, InstructBLIP) directory to `out`,
    with its processor: the tiny LLM of `llm_dir` as its language model, "<image>" added to its tokenizer."""
    tok = transformers.AutoTokenizer.from_pretrained(llm_dir)
    tok.add_tokens(["<image>"], special_tokens=True)
    text_config = transformers.AutoConfig.from_pretrained(llm_dir)
    text_config.vocab_size = len(tok)
    text_config.tie_word_embeddings = False  # a head of its own, sharpened below
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    vision |= dict(image_size=32, patch_size=8)
    qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    qformer |= dict(encoder_hidden_size=32, cross_attention_frequency=2)
    common = dict(
        text_config=text_config.to_dict(),
        num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    image_processor = transformers.BlipImageProcessor(size={"height": 32, "width": 32})
    if qformer_tokenizer_dir is None:
        config = transformers.Blip2Config(vision_config=vision, qformer_config=qformer, **common)
        cls = transformers.Blip2ForConditionalGeneration
        processor = transformers.Blip2Processor(image_processor, tok, num_query_tokens=4)
    else:
        qtok = transformers.AutoTokenizer.from_pretrained(qformer_tokenizer_dir)
        qformer["vocab_size"] = len(qtok)
        config = transformers.InstructBlipConfig(vision_config=vision, qformer_config=qformer, **common)
        cls = transformers.InstructBlipForConditionalGeneration
        processor = transformers.InstructBlipProcessor(image_processor, tok, qtok, num_query_tokens=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
        with torch.no_grad():  # sharper than the 0.02 init, so that the LLM's outputs depend on the image
            for name, p in model.named_parameters():
                if not name.startswith("language_model."):
                    p.add_(torch.randn_like(p) * 0.05).mul_(4)
            model.language_model.get_output_embeddings().weight.normal_(
                0, 1
            )  # peaked logits: greedy text varies
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
