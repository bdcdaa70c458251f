"""Registry contracts: registration order is kept (format detection follows it), lazy entries import on first use."""

from __future__ import annotations

import sys

import pytest

import mllm.data.sources as sources
from mllm.registry import Registry
from mllm.vision import VISION_TOWERS


def test_names_keep_registration_order():
    reg: Registry = Registry("thing")
    for name in ("zeta", "alpha", "mid"):
        reg.register(name)(name.upper())
    assert reg.names() == ["zeta", "alpha", "mid"]


def test_lazy_entry_is_known_before_its_module_is_imported(monkeypatch):
    monkeypatch.delitem(sys.modules, "json.tool", raising=False)
    reg: Registry = Registry("thing")
    reg.register_lazy("tool", "json.tool:main")
    assert "tool" in reg and reg.names() == ["tool"]
    assert "json.tool" not in sys.modules
    assert reg.get("tool") is sys.modules["json.tool"].main
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("tool")(object())
    with pytest.raises(ValueError, match="package.module:attr"):
        reg.register_lazy("other", "json.tool")


def test_a_tower_with_an_optional_dependency_is_a_lazy_entry():
    assert "efficientnet-lite0" in VISION_TOWERS


class _Accepts:
    @classmethod
    def detect(cls, path, first):
        return True


class _Rejects:
    @classmethod
    def detect(cls, path, first):
        return False


def test_detection_follows_registration_order(monkeypatch, tmp_path):
    data = tmp_path / "d.json"
    data.write_text('[{"id": "0"}]')
    reg: Registry = Registry("data source format")
    reg.register("zz-first")(type("First", (_Accepts,), {}))
    reg.register("no")(_Rejects)
    reg.register("aa-second")(type("Second", (_Accepts,), {}))
    monkeypatch.setattr(sources, "SOURCES", reg)
    assert sources.detect_format(str(data)) == "zz-first"
