"""Demo data from easy-VQA: annotations recovered from the answers, LLaVA files, balanced yes/no, held-out test."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict

import pytest

from mllm.demo.data import DemoData, build_demo_data
from mllm.demo.easy_vqa import (
    COLORS,
    SHAPES,
    Annotation,
    Question,
    annotate,
    load_questions,
    question_type,
)
from mllm.demo.pipeline import RECIPES, shipped_recipes_dir

pytestmark = pytest.mark.demo


@pytest.mark.parametrize("split", ["train", "test"])
def test_annotations_answer_every_question_of_their_image(split):
    """`Question.answer_for` on the recovered annotations gives easy-VQA's own answer to every question."""
    questions = load_questions(split)
    notes = annotate(questions)
    answered = [q.answer_for(notes[q.image_id]) for q in questions]
    checked = [(a, q.answer) for a, q in zip(answered, questions, strict=True) if a is not None]
    assert len(checked) > 0.9 * len(questions)
    assert all(a == b for a, b in checked)
    assert sum(n.complete for n in notes.values()) > 0.85 * len(notes)


def test_contradicting_answers_stop_with_the_image_named():
    qs = [Question(7, "what color is the shape?", "red"), Question(7, "is there a red shape?", "no")]
    with pytest.raises(ValueError, match="image 7: contradicting answers about its color"):
        annotate(qs)


def test_partly_known_image_is_never_guessed():
    notes = annotate(
        [Question(3, "what shape is in the image?", "circle"), Question(3, "is there a red shape?", "no")]
    )
    assert notes[3] == Annotation(color=None, shape="circle") and not notes[3].complete


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-data")
    manifest = build_demo_data(str(out), DemoData(train_images=300, test_questions=200, seed=1))
    for name in RECIPES:
        shutil.copyfile(shipped_recipes_dir() / name, out / name)
    return out, manifest


def test_files_are_llava_format_with_captions_and_typed_test_questions(built):
    out, manifest = built
    stage1 = json.loads((out / "stage1.json").read_text())
    test = json.loads((out / "test.json").read_text())
    assert len(stage1) == manifest["stage1"]["samples"] > 250
    assert all(
        s["conversations"][1]["value"].startswith("A ") and s["conversations"][1]["value"].endswith(".")
        for s in stage1
    )
    words = stage1[0]["conversations"][1]["value"][2:-1].split()
    assert words[0] in COLORS and words[1] in SHAPES
    assert len(test) >= 200 and {s["question_type"] for s in test} == {"yes/no", "color", "shape"}
    for s in stage1 + test:
        assert s["conversations"][0]["value"].startswith("<image>\n") and os.path.isfile(out / s["image"])


def _images(sample: dict) -> list[str]:
    return sample["image"] if isinstance(sample["image"], list) else [sample["image"]]


def _training_images(out) -> set[str]:
    return {
        image
        for f in ("stage1.json", "stage2_yes_no.json", "stage2_open.json")
        for s in json.loads((out / f).read_text())
        for image in _images(s)
    }


def test_test_questions_are_whole_held_out_test_images(built):
    out, manifest = built
    test = json.loads((out / "test.json").read_text())
    train_images = _training_images(out)
    assert all(s["image"].startswith("images/test/") for s in test)
    assert all(i.startswith("images/train/") for i in train_images)
    per_image = Counter(s["image"] for s in test)
    everything = Counter(q.image_id for q in load_questions("test"))
    assert all(
        everything[int(os.path.basename(i)[:-4])] == n for i, n in per_image.items()
    )  # all their questions
    assert manifest["test"]["images"] == len(per_image)


def test_validation_is_whole_train_split_images_that_no_training_sample_shows(built):
    out, manifest = built
    files = {
        name: json.loads((out / f"{name}.json").read_text()) for name in ("val", "val_turns", "val_captions")
    }
    val_images = {image for rows in files.values() for s in rows for image in _images(s)}
    assert all(i.startswith("images/train/") and os.path.isfile(out / i) for i in val_images)
    assert not val_images & _training_images(out)  # disjoint from every training sample
    per_image = Counter(s["image"] for s in files["val"])
    everything = Counter(q.image_id for q in load_questions("train"))
    assert all(everything[int(os.path.basename(i)[:-4])] == n for i, n in per_image.items())
    assert len(files["val"]) == manifest["val"]["questions"] >= 1000 and set(per_image) == val_images
    assert {s["question_type"] for s in files["val"]} == {"yes/no", "color", "shape"}


@pytest.mark.parametrize("split", ["val", "test"])
def test_turn_items_ask_each_question_once_more_as_a_later_turn_or_after_a_switch(built, split):
    """Every single question comes back exactly once in *_turns.json, as its last (scored) turn: turn 2 / turn 3
    after earlier questions about its image (with true answers), or after a turn about another image."""
    from mllm.eval.data import load_eval_items

    out, manifest = built
    single = json.loads((out / f"{split}.json").read_text())
    turns = json.loads((out / f"{split}_turns.json").read_text())
    scored = Counter(
        (_images(s)[-1], s["conversations"][-2]["value"].removeprefix("<image>\n")) for s in turns
    )
    asked = Counter((s["image"], s["conversations"][0]["value"].removeprefix("<image>\n")) for s in single)
    assert scored == asked
    truth = {
        (q.image_id, q.question, q.answer) for q in load_questions("train" if split == "val" else "test")
    }
    kinds = Counter(s["question_type"] for s in turns)
    assert set(kinds) == {"turn 2", "turn 3", "after switch"} and kinds == Counter(manifest[split]["turns"])
    for s in turns:
        images, conv = _images(s), s["conversations"]
        questions = conv[::2]
        if s["question_type"] == "after switch":
            assert len(images) == 2 and images[0] != images[1] and len(conv) == 4
            assert all(q["value"].startswith("<image>\n") for q in questions)
        else:
            assert len(images) == 1 and len(conv) == 2 * int(s["question_type"][-1])
            assert questions[0]["value"].startswith("<image>\n")
            assert not any("<image>" in q["value"] for q in questions[1:])
        owners = [images[0]] * (len(questions) - 1) + [images[-1]]
        for image, q, a in zip(owners, questions, conv[1::2], strict=True):
            assert (
                int(os.path.basename(image)[:-4]),
                q["value"].removeprefix("<image>\n"),
                a["value"],
            ) in truth
    items = load_eval_items(str(out / f"demo_{split}_turns.yaml"))
    assert [it.reference for it in items] == [s["conversations"][-1]["value"] for s in turns]
    assert all(
        it.messages[-1]["role"] == "user" and len(it.messages) == len(s["conversations"]) - 1
        for it, s in zip(items, turns, strict=True)
    )
    assert [len(it.images) for it in items] == [len(_images(s)) for s in turns]


def test_stage2_sources_hold_one_kind_each_and_yes_no_is_balanced_for_every_wording(built):
    out, manifest = built
    yes_no = json.loads((out / "stage2_yes_no.json").read_text())
    open_ = json.loads((out / "stage2_open.json").read_text())
    assert {question_type(s["conversations"][1]["value"]) for s in yes_no} == {"yes/no"}
    assert {question_type(s["conversations"][1]["value"]) for s in open_} == {"color", "shape"}
    assert all("image" in s for s in yes_no + open_)
    assert len(yes_no) + len(open_) == manifest["stage2"]["samples"]
    assert json.loads((out / "stage2_text.json").read_text()) == []  # text_yes_no = 0 here
    counts = defaultdict(Counter)
    for s in yes_no:
        q = Question(0, s["conversations"][0]["value"].split("\n", 1)[1], s["conversations"][1]["value"])
        if q.type == "yes/no":
            counts[(q.negated, q.asks_about)][q.answer] += 1
    assert len(counts) == 4
    assert all(c["yes"] == c["no"] > 0 for c in counts.values())


def test_shipped_recipes_tokenise_the_built_data(built, backbones):
    from transformers import AutoTokenizer

    from mllm.data import build_dataset, load_recipe

    out, _ = built
    tokenizer = AutoTokenizer.from_pretrained(backbones["llama"])
    stage1 = load_recipe(str(out / "demo_stage1.yaml"))
    stage2 = load_recipe(str(out / "demo_stage2.yaml"))
    assert stage1.template == "plain" and stage2.template == "chatml"
    assert [src.weight for src in stage2.sources] == [0.35, 0.30, 0.35]
    for recipe in (stage1, stage2, load_recipe(str(out / "demo_test.yaml"))):
        ds = build_dataset(recipe, tokenizer, image_tokens=9, preprocess=None, seed=0, progress=False)
        files = [json.loads(open(src.path).read()) for src in recipe.sources]
        assert len(ds) == sum(map(len, files)) and all(ds.has_image)


def test_eval_reads_question_types(built):
    from mllm.eval.data import load_eval_items

    out, _ = built
    items = load_eval_items(str(out / "demo_test.yaml"))
    assert {it.type for it in items} == {"yes/no", "color", "shape"}
    assert all(it.reference in ("yes", "no", *COLORS, *SHAPES) for it in items)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="train_images"):
        DemoData(train_images=0)
    with pytest.raises(ValueError, match="test_questions"):
        DemoData(test_questions=10**6)
    with pytest.raises(ValueError, match="text_yes_no is a share of the yes/no questions, in 0..1; got 2"):
        DemoData(text_yes_no=2)
    with pytest.raises(ValueError, match="switch is a share"):
        DemoData(switch=1.5)
    with pytest.raises(ValueError, match="multi_turn > 0 needs questions_per_sample >= 2"):
        DemoData(multi_turn=0.5)


def test_too_many_training_images_for_what_validation_leaves_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"train_images=4000, but only 3\d\d\d train-split images are left"):
        build_demo_data(str(tmp_path), DemoData(train_images=4000, test_questions=20))


def test_text_drills_ask_each_yes_no_question_about_a_caption_with_balanced_answers(tmp_path, backbones):
    from transformers import AutoTokenizer

    from mllm.data import build_dataset, load_recipe

    cfg = dict(train_images=120, test_questions=20, balance_yes_no=False, seed=3)
    plain = build_demo_data(str(tmp_path / "plain"), DemoData(**cfg))
    manifest = build_demo_data(str(tmp_path / "drills"), DemoData(**cfg, text_yes_no=1.0))
    samples = [
        s
        for part in ("yes_no", "open", "text")
        for s in json.loads((tmp_path / "drills" / f"stage2_{part}.json").read_text())
    ]
    drills = json.loads((tmp_path / "drills" / "stage2_text.json").read_text())
    assert all("image" not in s for s in drills)
    assert manifest["stage2"]["text_drills"] == len(drills) == plain["stage2"]["by_type"]["yes/no"]
    assert manifest["stage2"]["samples"] == plain["stage2"]["samples"] == len(samples) - len(drills)
    captions = {
        s["conversations"][1]["value"] for s in json.loads((tmp_path / "drills" / "stage1.json").read_text())
    }
    answers = Counter()
    for s in drills:
        (human, gpt) = s["conversations"]
        caption, question = human["value"].split("\n")
        color, shape = caption[2:-1].split()
        assert caption in captions and "<image>" not in human["value"]
        assert gpt["value"] == Question(0, question, "yes").answer_for(Annotation(color, shape))
        answers[(Question(0, question, "yes").asks_about, gpt["value"])] += 1
    for about in ("color", "shape"):  # the wording no longer tells the answer
        assert 0.35 < answers[about, "yes"] / (answers[about, "yes"] + answers[about, "no"]) < 0.65
    shutil.copyfile(shipped_recipes_dir() / "demo_stage2.yaml", tmp_path / "drills" / "demo_stage2.yaml")
    tokenizer = AutoTokenizer.from_pretrained(backbones["llama"])
    recipe = load_recipe(str(tmp_path / "drills" / "demo_stage2.yaml"))
    ds = build_dataset(recipe, tokenizer, image_tokens=9, preprocess=None, seed=0, progress=False)
    assert len(ds) == len(samples) and sum(ds.has_image) == len(samples) - len(drills)


def test_multi_turn_stage2_keeps_every_question_with_its_own_image(tmp_path, backbones):
    from transformers import AutoTokenizer

    from mllm.data import build_dataset, load_recipe

    cfg = dict(train_images=60, test_questions=20, balance_yes_no=False, seed=2)
    one = build_demo_data(str(tmp_path / "one"), DemoData(**cfg))
    four = build_demo_data(
        str(tmp_path / "four"), DemoData(**cfg, questions_per_sample=3, multi_turn=0.5, switch=0.3)
    )
    samples = [
        s
        for part in ("yes_no", "open")
        for s in json.loads((tmp_path / "four" / f"stage2_{part}.json").read_text())
    ]
    assert four["stage2"]["questions"] == one["stage2"]["questions"] == one["stage2"]["samples"]
    assert four["stage2"]["by_type"] == one["stage2"]["by_type"] and len(samples) < one["stage2"]["samples"]
    truth = {(q.image_id, q.question, q.answer) for q in load_questions("train")}
    sizes = Counter(len(s["conversations"]) // 2 for s in samples)
    assert sizes[1] and sizes[2] and max(sizes) <= 6 and four["stage2"]["turns"]["with_switch"] > 0
    for s in samples:
        turns = s["conversations"]
        images = s["image"] if isinstance(s["image"], list) else [s["image"]]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in turns) == len(images) == len(set(images)) <= 2
        image = None
        for q, a in zip(turns[::2], turns[1::2], strict=True):
            if q["value"].startswith("<image>\n"):  # a switch: the later turns are about the next image
                image = int(os.path.basename(images.pop(0))[:-4])
            assert (image, q["value"].removeprefix("<image>\n"), a["value"]) in truth
    shutil.copyfile(shipped_recipes_dir() / "demo_stage2.yaml", tmp_path / "four" / "demo_stage2.yaml")
    tokenizer = AutoTokenizer.from_pretrained(backbones["llama"])
    recipe = load_recipe(str(tmp_path / "four" / "demo_stage2.yaml"))
    ds = build_dataset(recipe, tokenizer, image_tokens=9, preprocess=None, seed=0, progress=False)
    assert len(ds) == len(samples)
