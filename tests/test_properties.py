"""Property-based tests (hypothesis) of conversation → (ids, labels), over families, templates and truncation."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from mllm.config import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID
from mllm.data import BadSampleError
from mllm.data.encode import ConversationEncoder

K = 3  # image tokens per image
END_OF_TURN = ("", "<|im_end|>", "</s>")  # as text, when the tokenizer does not know them as special tokens
_WORDS = st.sampled_from(
    ["red", "circle", "What", "is", "shape?", "Yes.", "no", "a", "blue", "42", "é", "the", "photo"]
)
_TEXT = st.lists(_WORDS, min_size=1, max_size=8).map(" ".join)


@st.composite
def conversations(draw):
    """A system prompt maybe, then user/assistant pairs; images only in user turns."""
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_TEXT)})
    for _ in range(draw(st.integers(1, 3))):
        pieces = draw(st.lists(st.one_of(_TEXT, st.just(IMAGE_PLACEHOLDER)), min_size=1, max_size=4))
        messages.append({"role": "user", "content": " ".join(pieces)})
        messages.append({"role": "assistant", "content": draw(_TEXT)})
    return messages


@pytest.fixture(scope="module")
def tokenizers(backbones):
    return {fam: AutoTokenizer.from_pretrained(backbones[fam]) for fam in ("llama", "qwen2", "gpt2", "phi3")}


CASES = list(itertools.product(["llama", "qwen2", "gpt2", "phi3"], ["auto", "chatml", "vicuna_v1"]))


def _image_runs(ids: list[int]) -> list[int]:
    return [len(list(g)) for is_img, g in itertools.groupby(ids, key=lambda t: t == IMAGE_TOKEN_ID) if is_img]


@pytest.mark.parametrize("family,template", CASES)
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(messages=conversations(), max_length=st.one_of(st.none(), st.integers(4, 80)))
def test_encoding_invariants(tokenizers, family, template, messages, max_length):
    tok = tokenizers[family]
    encoder = ConversationEncoder(tok, template, image_tokens=K, max_length=max_length)
    try:
        enc = encoder.encode_full(messages)
    except BadSampleError as e:  # the only acceptable refusals: a lost answer, images that do not fit
        assert e.kind in ("answer_truncated", "images_do_not_fit") and max_length is not None
        if e.kind == "images_do_not_fit":
            full = ConversationEncoder(tok, template, image_tokens=K).encode_full(messages).input_ids
            last_image_end = len(full) - full[::-1].index(IMAGE_TOKEN_ID)
            assert last_image_end > max_length
        return
    ids, labels = enc.input_ids, enc.labels
    # equal lengths, and within the limit
    assert len(ids) == len(labels)
    assert max_length is None or len(ids) <= max_length
    # truncation never splits an image: every run of image tokens is whole images
    runs = _image_runs(ids)
    assert all(r % K == 0 for r in runs)
    # every placeholder maps to exactly one image's K tokens: truncation never drops an image
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    assert sum(runs) == K * enc.num_images
    assert enc.num_images == placeholders
    # labels are either ignored or equal to the token, never on an image token
    assert all(lab in (-100, tid) for lab, tid in zip(labels, ids, strict=True))
    assert all(lab == -100 for lab, tid in zip(labels, ids, strict=True) if tid == IMAGE_TOKEN_ID)
    # each supervised run is one assistant answer (+ its end-of-turn), in order; never user or system text
    runs = [
        tok.decode([t for _, t in g], skip_special_tokens=True).strip()
        for sup, g in itertools.groupby(zip(labels, ids, strict=True), key=lambda p: p[0] != -100)
        if sup
    ]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) <= len(answers)
    for i, run in enumerate(runs):
        last = i == len(runs) - 1
        if (
            enc.truncated and last and answers[i].startswith(run.rstrip("\ufffd"))
        ):  # cut inside a multi-byte char
            continue
        # the answer, then only end-of-turn text (a built-in template's marker may be plain text to this tokenizer)
        assert run.startswith(answers[i]), (run, answers[i])
        rest = run[len(answers[i]) :].strip()
        assert (
            any(marker.startswith(rest) for marker in END_OF_TURN)
            if enc.truncated and last
            else rest in END_OF_TURN
        ), (
            run,
            answers[i],
        )
    if not enc.truncated:
        assert len(runs) == len(answers)
