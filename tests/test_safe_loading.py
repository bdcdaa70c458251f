"""Safe loading: no pickle is ever unpickled with code execution allowed, model code from a folder runs only on
the user's explicit flag (never on a checkpoint's say-so), and checkpoints naming unknown parts are refused."""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_checkpoint

from mllm.checkpoint import CheckpointError, load_model_and_config, mark_complete
from mllm.config import LLMConfig, ModelConfig
from mllm.model import build_model
from mllm.train.config import TrainConfig, add_config_arguments, resolve_config

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "mllm").rglob("*.py"), *(ROOT / "scripts").glob("*.py")])


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def keyword(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<not a constant>"
    return None


def test_no_unsafe_deserialisation_anywhere_in_the_package():
    assert len(SOURCES) > 50
    found, unsafe = 0, []
    for path in SOURCES:
        for call, name in calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{call.lineno} {ast.unparse(call)[:80]}"
            if name == "torch.load":
                found += 1
                if keyword(call, "weights_only") is not True:
                    unsafe.append(where)
            elif name in (
                "pickle.load",
                "pickle.loads",
                "dill.load",
                "dill.loads",
                "joblib.load",
                "eval",
                "exec",
            ):
                unsafe.append(where)
            elif name in ("np.load", "numpy.load") and keyword(call, "allow_pickle") is not False:
                unsafe.append(where)
            elif name.endswith("from_pretrained") and keyword(call, "trust_remote_code") is True:
                unsafe.append(where)  # hard-wired on: only the user's flag may turn it on
    assert found >= 2, "the scan found no torch.load at all: is it still looking at the package?"
    assert not unsafe, "unsafe loading:\n" + "\n".join(unsafe)


def test_checkpoint_weights_are_safetensors_only(tmp_path, tiny_config):
    ckpt = Path(make_checkpoint(tmp_path / "c", tiny_config("clip", "llama", "mlp", mode="lora")))
    weights = [
        p for p in ckpt.rglob("*") if p.is_file() and p.suffix not in (".json",) and p.name != "COMPLETE"
    ]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights
    source = (ROOT / "mllm" / "checkpoint.py").read_text()
    assert "torch.load" not in source and "from safetensors.torch import load_file" in source


def pickle_backbone(src: str, dst: Path) -> Path:
    """The tiny LLM with its weights as pytorch_model.bin, plus an object whose unpickling would write PWNED."""
    from transformers import AutoModelForCausalLM

    dst.mkdir()
    for f in os.listdir(src):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(src, f), dst)
    state = AutoModelForCausalLM.from_pretrained(src).state_dict()
    state["payload"] = Payload(str(dst / "PWNED"))
    torch.save(state, dst / "pytorch_model.bin")
    return dst / "PWNED"


class Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickled_backbone_never_runs_its_payload(backbones, tmp_path, tiny_config):
    pwned = pickle_backbone(backbones["llama"], tmp_path / "llm-pickled")
    cfg = tiny_config("clip", "llama")
    cfg.llm.path = str(tmp_path / "llm-pickled")
    with pytest.raises(Exception, match="Weights only load failed"):
        build_model(cfg)
    assert not pwned.exists()


REMOTE_CONFIG = """
from pathlib import Path
Path({sentinel!r}).write_text("the folder's own code ran")
from transformers import LlamaConfig
class RemoteConfig(LlamaConfig):
    model_type = "remote-llama"
"""
REMOTE_MODEL = """
from transformers import LlamaForCausalLM
from .configuration_remote import RemoteConfig
class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig
"""


def remote_code_backbone(src: str, dst: Path) -> Path:
    """The tiny LLM, declaring custom classes in its own .py files (auto_map), which write a sentinel on import."""
    shutil.copytree(src, dst)
    sentinel = dst / "CODE_RAN"
    (dst / "configuration_remote.py").write_text(REMOTE_CONFIG.format(sentinel=str(sentinel)))
    (dst / "modeling_remote.py").write_text(REMOTE_MODEL)
    config = json.loads((dst / "config.json").read_text())
    config["model_type"] = (
        "remote-llama"  # a type transformers does not know: only the folder's code can load it
    )
    config["auto_map"] = {
        "AutoConfig": "configuration_remote.RemoteConfig",
        "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
    }
    (dst / "config.json").write_text(json.dumps(config))
    return sentinel


def test_trust_remote_code_is_off_unless_the_user_passes_the_flag(backbones, tmp_path):
    import argparse

    assert TrainConfig().trust_remote_code is False and LLMConfig().trust_remote_code is False
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert resolve_config(parser.parse_args([])).model_config().llm.trust_remote_code is False
    flagged = resolve_config(parser.parse_args(["--trust-remote-code"]))
    assert flagged.trust_remote_code is True and flagged.model_config().llm.trust_remote_code is True

    sentinel = remote_code_backbone(backbones["llama"], tmp_path / "llm-remote")
    cfg = resolve_config(
        parser.parse_args(["--vision", backbones["clip"], "--llm", str(tmp_path / "llm-remote")])
    )
    mcfg = cfg.model_config()
    mcfg.dtype = "fp32"
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_model(mcfg)
    assert not sentinel.exists()

    mcfg.llm.trust_remote_code = True  # what --trust-remote-code sets: it reaches from_pretrained
    model = build_model(mcfg)
    assert sentinel.exists() and type(model.llm).__name__ == "RemoteForCausalLM"


def test_a_checkpoint_cannot_switch_trust_remote_code_on(backbones, tmp_path, tiny_config):
    sentinel = remote_code_backbone(backbones["llama"], tmp_path / "llm-remote")
    cfg = tiny_config("clip", "llama")
    cfg.llm.path = str(tmp_path / "llm-remote")
    cfg.llm.trust_remote_code = True  # e.g. a downloaded checkpoint whose config asks for it
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, ModelConfig.from_dict(cfg.to_dict()))
    sentinel.unlink()  # written while making the checkpoint (that run trusted the code)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model_and_config(ckpt)
    assert not sentinel.exists()
    model, _ = load_model_and_config(
        ckpt, trust_remote_code=True
    )  # (its module is imported already: no new sentinel)
    assert type(model.llm).__name__ == "RemoteForCausalLM"


def rewrite_config(ckpt: Path, edit) -> None:
    config = json.loads((ckpt / "mllm_config.json").read_text())
    edit(config)
    (ckpt / "mllm_config.json").write_text(json.dumps(config))
    mark_complete(ckpt)


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda c: c["model"]["vision"].update(kind="eva-clip-giant"),
            "unknown vision tower 'eva-clip-giant'",
        ),
        (lambda c: c["model"]["connector"].update(kind="perceiver-xl"), "unknown connector 'perceiver-xl'"),
        (lambda c: c.update(format_version=2), "format version 2; this mllm reads version 1"),
        (lambda c: c.pop("format_version"), "format version None"),
    ],
    ids=["tower", "connector", "newer-format", "no-format"],
)
def test_a_checkpoint_naming_unknown_parts_is_refused_clearly(tmp_path, tiny_config, edit, message):
    ckpt = Path(make_checkpoint(tmp_path / "c", tiny_config()))
    rewrite_config(ckpt, edit)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")) as err:
        load_model_and_config(ckpt)
    assert str(ckpt) in str(err.value)


def test_chat_eval_and_export_run_folder_code_only_with_the_flag(backbones, tmp_path, tiny_config, capsys):
    from helpers import make_image

    from mllm.cli import main

    remote_code_backbone(backbones["llama"], tmp_path / "llm-remote")
    cfg = tiny_config("clip", "llama", mode="lora")
    cfg.llm.path = str(tmp_path / "llm-remote")
    cfg.llm.lora.r = 2
    cfg.llm.trust_remote_code = True  # the checkpoint asks for it: that alone must not be enough
    ckpt = make_checkpoint(tmp_path / "ckpt", ModelConfig.from_dict(cfg.to_dict()), template="chatml")
    make_image(0).save(tmp_path / "a.png")
    record = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nhi"}]}
    record["conversations"].append({"from": "gpt", "value": "yes"})
    (tmp_path / "qa.json").write_text(json.dumps([record]))
    commands = {
        "chat": ["chat", ckpt, "--prompt", "hi", "--max-new-tokens", "2"],
        "eval": ["eval", ckpt, "--data", str(tmp_path / "qa.json"), "--max-new-tokens", "2", "--no-progress"],
        "export": ["export", ckpt, str(tmp_path / "merged"), "--merge-lora"],
    }
    for name, argv in commands.items():
        capsys.readouterr()
        assert main(argv) == 2, name
        assert "trust_remote_code" in capsys.readouterr().err, name
        assert main([*argv, "--trust-remote-code"]) == 0, name
    assert load_model_and_config(tmp_path / "merged", trust_remote_code=True)[0].llm.__class__.__name__ == (
        "RemoteForCausalLM"
    )
