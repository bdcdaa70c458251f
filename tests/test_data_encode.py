"""encode_conversation: ids and labels built together; loss only on assistant content + end-of-turn, for every
template and every tiny LM family; truncation never cuts an image; mismatches raise instead of zeroing labels."""

from __future__ import annotations

import functools

import pytest

from mllm.config import IMAGE_TOKEN_ID
from mllm.data import IGNORE_INDEX, TEMPLATES, BadSampleError, encode_conversation
from mllm.data.encode import ConversationEncoder
from mllm.testing.backbones import LLM_FAMILIES
from mllm.testing.tokenizers import make_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "<image>\nWhat shape is in the image?"},
    {"role": "assistant", "content": "It is a circle."},
    {"role": "user", "content": "What color is the shape?"},
    {"role": "assistant", "content": "The shape is blue."},
]
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


@functools.lru_cache
def tokenizer(family: str):
    return make_tokenizer(family)


def supervised_segments(tok, ids, labels) -> list[str]:
    """Decoded runs of consecutive supervised tokens."""
    segments, run = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == i, "a supervised label must be the token itself"
            run.append(lab)
        elif run:
            segments.append(tok.decode(run))
            run = []
    if run:
        segments.append(tok.decode(run))
    return segments


def end_of_turn(tok, template: str) -> str:
    return END_OF_TURN.get(template) or tok.eos_token


@pytest.mark.parametrize("family", LLM_FAMILIES)
@pytest.mark.parametrize("template", TEMPLATES.names())
def test_supervised_tokens_are_exactly_the_answers(family, template):
    tok = tokenizer(family)
    ids, labels = encode_conversation(CONVERSATION, tok, template, image_tokens=5)
    assert len(ids) == len(labels)
    eot = end_of_turn(tok, "auto" if template == "auto" else template)
    answers = [m["content"] + eot for m in CONVERSATION if m["role"] == "assistant"]
    segments = supervised_segments(tok, ids, labels)
    if template == "plain":  # captioning: answers follow each other with nothing in between
        answers = ["".join(answers)]
    # a leading space the template puts before the answer ("ASSISTANT: It") travels with the first answer token
    assert [s.lstrip(" ") for s in segments] == answers
    image_pos = [k for k, i in enumerate(ids) if i == IMAGE_TOKEN_ID]
    assert len(image_pos) == 5 and image_pos == list(range(image_pos[0], image_pos[0] + 5))
    assert all(labels[k] == IGNORE_INDEX for k in image_pos)
    if template != "plain":  # the prompt text is there, unsupervised
        prompt = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX and i >= 0])
        assert "What color is the shape?" in prompt


@pytest.mark.parametrize("family", LLM_FAMILIES)
@pytest.mark.parametrize("template", TEMPLATES.names())
def test_generation_prompt_is_a_prefix_of_training_ids(family, template):
    """What chat feeds the model at inference is exactly what training saw before the answer."""
    tok = tokenizer(family)
    prompt_ids, prompt_labels = encode_conversation(
        CONVERSATION[:4], tok, template, image_tokens=2, add_generation_prompt=True
    )
    full_ids, full_labels = encode_conversation(CONVERSATION, tok, template, image_tokens=2)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert full_labels[: len(prompt_ids)] == prompt_labels
    assert template == "plain" or prompt_labels[-1] == IGNORE_INDEX  # plain has no assistant header
    # the last answer starts right after the prompt
    assert full_labels[len(prompt_ids)] != IGNORE_INDEX


def test_truncation_never_cuts_or_drops_an_image():
    tok = tokenizer("llama")
    conv = [
        {"role": "user", "content": "Look: <image> and <image>"},
        {"role": "assistant", "content": "Two shapes."},
    ]
    full, _ = encode_conversation(conv, tok, "llama3", image_tokens=10)
    first = full.index(IMAGE_TOKEN_ID)
    for cut in (
        first + 5,
        first + 15,
        first + 20,
    ):  # inside the 1st image, inside the 2nd, just before its end
        with pytest.raises(BadSampleError, match="images_do_not_fit"):
            encode_conversation(conv, tok, "llama3", image_tokens=10, max_length=cut)
    conv2 = [
        {"role": "user", "content": "<image>"},
        {"role": "assistant", "content": "It is a circle."},
        *conv,
    ]
    full2, _ = encode_conversation(conv2, tok, "llama3", image_tokens=10)
    last_image_end = len(full2) - full2[::-1].index(IMAGE_TOKEN_ID)
    # a cut after every image only drops text; the sample keeps all three images whole
    ids, labels = encode_conversation(conv2, tok, "llama3", image_tokens=10, max_length=last_image_end + 2)
    assert len(ids) == last_image_end + 2 and ids.count(IMAGE_TOKEN_ID) == 30
    assert any(lab != IGNORE_INDEX for lab in labels)


def test_cut_before_an_image_in_the_answer_refuses_the_sample():
    tok = tokenizer("qwen2")
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello <image> there"}]
    full, _ = encode_conversation(conv, tok, "chatml", image_tokens=8)
    start = full.index(IMAGE_TOKEN_ID)
    with pytest.raises(BadSampleError, match="images_do_not_fit"):
        encode_conversation(conv, tok, "chatml", image_tokens=8, max_length=start + 3)


def test_images_take_their_own_token_counts():
    tok = tokenizer("llama")
    conv = [
        {"role": "user", "content": "<image> first, then <image>"},
        {"role": "assistant", "content": "And <image> here."},
    ]
    encoder = ConversationEncoder(tok, "llama3")
    ids, labels = encoder.encode(conv, image_tokens=[3, 7, 1])
    runs = [len(r) for r in "".join("i" if t == IMAGE_TOKEN_ID else "." for t in ids).split(".") if r]
    assert runs == [3, 7, 1]
    assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels, strict=True) if t == IMAGE_TOKEN_ID)
    with pytest.raises(BadSampleError, match="image_count_mismatch"):
        encoder.encode(conv, image_tokens=[3, 7])


def _with_template(family: str, template: str):
    tok = make_tokenizer(family)
    tok.chat_template = template
    return tok


def test_token_joining_scaffold_and_answer_raises_not_zeroes():
    tmpl = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}Th{{ m['content'] }}<|eot_id|>"
        "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    )
    tok = _with_template("llama", tmpl)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "e shape is blue."}]
    with pytest.raises(BadSampleError, match="tokenization_mismatch"):
        encode_conversation(conv, tok, "auto", image_tokens=1)


def test_unstable_or_endless_chat_templates_raise():
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    unstable = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}"
    with pytest.raises(ValueError, match="renders the conversation before this answer differently"):
        encode_conversation(conv, _with_template("llama", unstable), "auto", image_tokens=1)
    endless = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="no end-of-turn special token"):
        encode_conversation(conv, _with_template("llama", endless), "auto", image_tokens=1)
    tok = make_tokenizer("llama")
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template"):
        encode_conversation(conv, tok, "auto", image_tokens=1)
    with pytest.raises(KeyError, match="unknown chat template"):
        encode_conversation(conv, tok, "vicuna", image_tokens=1)


def test_plain_template_layout_is_exact():
    tok = tokenizer("llama")
    conv = [
        {"role": "user", "content": "Describe the photo.\n<image>"},
        {"role": "assistant", "content": "a red circle"},
    ]
    ids, labels = encode_conversation(conv, tok, "plain", image_tokens=3)
    caption = tok("a red circle", add_special_tokens=False)["input_ids"]
    assert ids == [tok.bos_token_id] + [IMAGE_TOKEN_ID] * 3 + caption + [tok.eos_token_id]
    assert labels == [IGNORE_INDEX] * 4 + caption + [tok.eos_token_id]


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_ids_equal_the_tokenizers_own_encoding_of_its_chat_template(family):
    tok = tokenizer(family)
    conv = [m for m in CONVERSATION if "<image>" not in m["content"]]
    ids, _ = encode_conversation(conv, tok, "auto", image_tokens=1)
    text = tok.apply_chat_template(conv, tokenize=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]


def test_a_chat_template_rejecting_a_conversation_is_a_bad_sample():
    strict = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
    )
    with pytest.raises(BadSampleError, match=r"\[template_error\].*no system role"):
        encode_conversation(CONVERSATION, _with_template("llama", strict), "auto", image_tokens=1)


def test_padding_and_truncation_saved_in_a_tokenizer_json_change_nothing():
    """A tokenizer.json may carry fixed padding and truncation (sentence-transformers exports pad and cut every
    text to 128): the encoder's ids are those of the same tokenizer without them, and the caller's tokenizer keeps
    its settings."""
    from transformers import PreTrainedTokenizerFast

    tok = tokenizer("llama")
    backend = type(tok.backend_tokenizer).from_str(tok.backend_tokenizer.to_str())
    backend.enable_padding(length=24, pad_id=tok.pad_token_id or 0)
    backend.enable_truncation(max_length=6)
    padded = PreTrainedTokenizerFast(tokenizer_object=backend, **tok.special_tokens_map)
    conv = [
        {"role": "user", "content": "<image>\nWhat shape is in the image, and what colour does it have?"},
        {"role": "assistant", "content": "It is a circle, and the circle is blue."},
    ]
    want = encode_conversation(conv, tok, "plain", image_tokens=3)
    assert encode_conversation(conv, padded, "plain", image_tokens=3) == want
    assert len(want[0]) > 6 + 3  # longer than the saved truncation would have let through
    assert padded.backend_tokenizer.padding["length"] == 24 and padded.backend_tokenizer.truncation
