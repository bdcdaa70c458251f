"""LLaVA JSON / JSONL (also ShareGPT `conversations`): `id`, `image` (a path or a list), `conversations` [{from, value}].

Loads the published LLaVA-Pretrain (`blip_laion_cc_sbu_558k.json`) and
LLaVA-1.5 mix (`llava_v1_5_mix665k.json`) files as they are, text-only samples included.
"""

from __future__ import annotations

from typing import Any

from mllm.data.errors import BadSampleError
from mllm.data.recipe import SourceSpec
from mllm.data.sample import Sample, role_of
from mllm.data.sources.base import RecordFileSource
from mllm.data.sources.records import JsonRecords, image_refs


def conversations_sample(rec: dict[str, Any], fallback_id: str) -> Sample:
    """A record with `conversations: [{from, value}]` and `image` / `images` → Sample."""
    turns = rec.get("conversations")
    if not isinstance(turns, list):
        raise BadSampleError("invalid_record", "`conversations` must be a list of {from, value} turns")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "value" not in t:
            raise BadSampleError("invalid_record", f"turn {i} must be an object with `from` and `value`")
        if not isinstance(t["value"], str):
            raise BadSampleError("bad_content", f"turn {i}: `value` must be a string")
        messages.append({"role": role_of(t.get("from", t.get("role"))), "content": t["value"]})
    rid = rec.get("id")
    images = image_refs(rec.get("image", rec.get("images")))
    return Sample(id=str(rid) if rid is not None else fallback_id, messages=messages, images=images)


class LlavaSource(RecordFileSource):
    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self.records = JsonRecords(spec.path)

    @classmethod
    def detect(cls, path: str, first: Any) -> bool:
        return path.endswith((".json", ".jsonl")) and isinstance(first, dict) and "conversations" in first

    def sample(self, index: int) -> Sample:
        return conversations_sample(self.records[index], f"{self.name}:{index}")
