"""BLIP-2 / InstructBLIP in and out: `mllm import` a transformers directory, `mllm export --format hf-blip2 |
hf-instructblip` back; plain transformers computes our logits (fp32) and greedy text on tiny offline checkpoints."""

from __future__ import annotations

import pytest
import torch
from helpers import make_checkpoint, make_image

PROMPT = "What shape is in the image?"
FORMATS = {"blip2": "hf-blip2", "instructblip": "hf-instructblip"}


@pytest.fixture(scope="module")
def sources(backbones, tmp_path_factory) -> dict[str, str]:
    """{'blip2', 'instructblip'} → a tiny random transformers directory (tiny llama LLM) with its processor."""
    from mllm.testing import make_bert
    from mllm.testing.backbones import make_blip2

    root = tmp_path_factory.mktemp("blip2")
    bert = make_bert(str(root / "bert"))
    return {
        "blip2": make_blip2(str(root / "blip2"), backbones["llama"]),
        "instructblip": make_blip2(
            str(root / "instructblip"), backbones["llama"], qformer_tokenizer_dir=bert
        ),
    }


def _ours(model, processor, image):
    from mllm.inference import Conversation, SamplingConfig, generate_batch

    conv = Conversation.single(PROMPT, [image])
    batch = processor([conv])
    keys = (
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_counts",
        "qformer_input_ids",
        "qformer_attention_mask",
    )
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in keys if k in batch}, return_logits=True).logits
    answer = generate_batch(model, processor, [conv], SamplingConfig(max_new_tokens=6))[0]
    return batch, logits, answer


def _theirs(hf, batch, tokenizer, prompt_len):
    """transformers' logits and greedy text for our prompt (our image positions → its image token)."""
    from mllm.config import IMAGE_TOKEN_ID

    inputs = {
        "input_ids": batch["input_ids"].masked_fill(
            batch["input_ids"] == IMAGE_TOKEN_ID, hf.config.image_token_id
        ),
        "attention_mask": batch["attention_mask"],
        "pixel_values": batch["pixel_values"],
    }
    if "qformer_input_ids" in batch:
        inputs.update(
            qformer_input_ids=batch["qformer_input_ids"],
            qformer_attention_mask=batch["qformer_attention_mask"],
        )
    with torch.no_grad():
        logits = hf(**inputs).logits
        new = hf.generate(**inputs, max_new_tokens=6, do_sample=False)[0, prompt_len:]
    return logits, tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["blip2", "instructblip"])
def test_blip2_in_and_out_match_transformers(sources, tmp_path, family):
    import transformers

    from mllm.cli import main
    from mllm.inference import load_pretrained

    cls = {
        "blip2": transformers.Blip2ForConditionalGeneration,
        "instructblip": transformers.InstructBlipForConditionalGeneration,
    }[family]
    ckpt, out = tmp_path / "ckpt", tmp_path / "export"
    assert main(["import", sources[family], str(ckpt)]) == 0
    model, processor = load_pretrained(str(ckpt))
    assert model.config.vision.kind == "blip2" and model.config.connector.instruction_aware == (
        family == "instructblip"
    )
    image = make_image(7, size=32)
    batch, ours, answer = _ours(model, processor, image)
    vocab = ours.shape[-1]
    n = batch["input_ids"].shape[1]
    for source in (sources[family], out):  # what we imported, and what we export
        if source == out:
            assert main(["export", str(ckpt), str(out), "--format", FORMATS[family]]) == 0
            assert type(transformers.AutoProcessor.from_pretrained(out)).__name__.startswith(cls.__name__[:5])
        hf = cls.from_pretrained(source, dtype=torch.float32).eval()
        theirs, text = _theirs(hf, batch, processor.tokenizer, n)
        assert (theirs[..., :vocab] - ours).abs().max().item() <= 1e-4, source
        assert text == answer, source


@pytest.mark.parametrize(
    "family, settings, reason",
    [
        ("blip2", {}, "vision tower 'hf'"),
        ("blip2", {"kind": "mlp"}, "connector mlp"),
        ("instructblip", {"kind": "qformer"}, "not instruction-aware"),
    ],
)
def test_blip2_export_refuses_what_blip2_cannot_express(
    backbones, tmp_path, capsys, family, settings, reason
):
    from mllm.cli import main
    from mllm.config import ConnectorConfig, LLMConfig, ModelConfig, VisionConfig

    cfg = ModelConfig(
        vision=VisionConfig(path=backbones["clip"]),
        connector=ConnectorConfig(**{"kind": "qformer", "num_queries": 4, "num_heads": 4, **settings}),
        llm=LLMConfig(path=backbones["llama"]),
        dtype="fp32",
    )
    ckpt = make_checkpoint(tmp_path / "ckpt", cfg)
    capsys.readouterr()
    assert main(["export", ckpt, str(tmp_path / "out"), "--format", FORMATS[family]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and reason in err[0] and "Supported:" in err[0]
    assert not (tmp_path / "out").exists()


def test_import_refuses_what_is_not_blip2(backbones, tmp_path, capsys):
    from mllm.cli import main

    assert main(["import", backbones["clip"], str(tmp_path / "out")]) == 2
    assert "mllm imports ['blip-2', 'instructblip']" in capsys.readouterr().err


@pytest.mark.slow
def test_a_text_aware_qformer_exports_to_blip2_without_its_text_half(sources, tmp_path):
    """A text-aware Q-Former that is not instruction-aware is BLIP-2's: its text half is dropped on export."""
    import json

    import transformers

    from mllm.checkpoint import CONFIG_FILE, mark_complete
    from mllm.cli import main
    from mllm.inference import load_pretrained

    ckpt = tmp_path / "ckpt"
    assert main(["import", sources["instructblip"], str(ckpt)]) == 0
    saved = json.loads((ckpt / CONFIG_FILE).read_text())
    saved["model"]["connector"]["instruction_aware"] = False
    (ckpt / CONFIG_FILE).write_text(json.dumps(saved))
    mark_complete(ckpt)
    model, processor = load_pretrained(str(ckpt))
    assert model.connector.text_aware and not model.connector.instruction_aware
    batch, ours, answer = _ours(model, processor, make_image(5, size=32))
    assert main(["export", str(ckpt), str(tmp_path / "hf"), "--format", "hf-blip2"]) == 0
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(
        tmp_path / "hf", dtype=torch.float32
    ).eval()
    assert not hf.config.qformer_config.use_qformer_text_input
    theirs, text = _theirs(hf, batch, processor.tokenizer, batch["input_ids"].shape[1])
    assert (theirs[..., : ours.shape[-1]] - ours).abs().max().item() <= 1e-4
    assert text == answer
