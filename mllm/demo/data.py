"""Write the demo data as LLaVA-format JSON: stage-1 captions, stage-2 questions, held-out test questions.

Layout under the output folder (the shipped `data_recipes/demo_*.yaml` recipes
name these files relative to their own folder):

    images/train/<id>.png, images/test/<id>.png
    stage1.json   one caption per training image        ("A blue triangle.")
    stage2_yes_no.json  train-split yes/no questions about an image (conversations of one or more turns,
                  some switching to another image; optionally balanced per wording)
    stage2_open.json    train-split colour and shape questions ("what color is the shape?"), likewise
    stage2_text.json    text drills: yes/no questions about a caption in words (`text_yes_no`)
                  — three sources, so that the stage-2 recipe weighs their shares of the mixture
    val.json, val_turns.json, val_captions.json
                  validation: the questions (one per conversation), the same questions asked as a later
                  turn or right after an image switch, and the captions of train-split images that no
                  training sample shows; every demo setting is chosen on these
    test.json, test_turns.json, test_captions.json
                  the same three of held-out easy-VQA *test* images (reported, never tuned on)
    manifest.json what was built, from what, with which settings

Every evaluation file gives each sample a `question_type`: yes/no | color | shape for single questions,
`turn 2` | `turn 3` | `after switch` for the conversations (the earlier turns carry their true answers).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

from mllm.config import IMAGE_PLACEHOLDER
from mllm.demo.easy_vqa import Annotation, Question, annotate, image_paths, load_questions, question_type

CAPTION_PROMPT = "Describe the image."


@dataclass
class DemoData:
    """How much of easy-VQA the demo uses."""

    train_images: int = 3800
    """Training images, drawn at random from the train split's 4,000 less the validation images; stage 1 and
    stage 2 both use these."""
    val_questions: int = 1000
    """At least this many validation questions: all questions of as many train-split images as that takes
    (~100); those images are in no training sample."""
    test_questions: int = 1000
    """At least this many held-out questions, all questions of as many test images as that takes."""
    balance_yes_no: bool = True
    """Equal yes and no answers for each wording kind (negated or not × asks colour or shape), so that the
    wording alone cannot answer a training question: easy-VQA's raw "is there a red shape?" is "no" 88% of
    the time; without balancing the model learns that wording prior instead of comparing question and image
    (docs/measurements.md)."""
    questions_per_sample: int = 1
    """Stage 2: up to this many questions about one image in one multi-turn conversation (the image once, in
    the first turn), as LLaVA's instruction data does; `multi_turn` says how many conversations have more than
    one. (docs/measurements.md: at 4 per conversation, fewer tokens per question, no accuracy gain.)"""
    multi_turn: float = 0.0
    """Stage 2: the share of image conversations holding 2..questions_per_sample questions (the rest hold one).
    Without any, the model answered a second question about the first one's image wrongly (issue 19)."""
    switch: float = 0.0
    """Stage 2: the share of image conversations followed, in the same sample, by another image's conversation
    of the same kind: a later user turn with its own `<image>` (what `mllm chat`'s /image does)."""
    text_yes_no: float = 0.0
    """Stage 2: this share of the yes/no questions is also asked about a caption in words — a text-only
    sample ("A red circle.\nis there a blue shape?" → "no"), its caption drawn from the training images so
    that yes and no come equally often. SmolLM2-135M does not compare a question with a caption zero-shot and
    LoRA teaches it that quickly on text; the image questions then reuse the comparison, fed by what the
    connector reads (docs/measurements.md, docs/demo.md)."""
    seed: int = 0

    def __post_init__(self):
        if self.questions_per_sample < 1:
            raise ValueError(f"questions_per_sample must be >= 1, got {self.questions_per_sample}")
        if not 1 <= self.train_images <= 4000:
            raise ValueError(f"train_images must be in 1..4000, got {self.train_images}")
        if not 1 <= self.val_questions <= 9000:
            raise ValueError(f"val_questions must be in 1..9000, got {self.val_questions}")
        for name in ("multi_turn", "switch"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"{name} is a share of the image conversations, in 0..1; got {getattr(self, name)}"
                )
        if self.multi_turn > 0 and self.questions_per_sample < 2:
            raise ValueError(
                "multi_turn > 0 needs questions_per_sample >= 2 (the most questions per conversation)"
            )
        if not 0.0 <= self.text_yes_no <= 1.0:
            raise ValueError(
                f"text_yes_no is a share of the yes/no questions, in 0..1; got {self.text_yes_no}"
            )
        if not 1 <= self.test_questions <= 9673:
            raise ValueError(f"test_questions must be in 1..9673, got {self.test_questions}")


def build_demo_data(out: str, cfg: DemoData) -> dict:
    """Write the files above into `out`; returns the manifest (counts per file and per question type)."""
    rng = random.Random(cfg.seed)
    train_q = load_questions("train")
    notes = annotate(train_q)
    val_q = _held_out(train_q, cfg.val_questions, rng)
    val_ids = sorted({q.image_id for _, q in val_q})
    free = sorted(set(notes) - set(val_ids))
    if cfg.train_images > len(free):
        raise ValueError(
            f"train_images={cfg.train_images}, but only {len(free)} train-split images are left after the "
            f"{len(val_ids)} validation images (val_questions={cfg.val_questions}); lower one of them"
        )
    train_ids = sorted(rng.sample(free, cfg.train_images))
    chosen = set(train_ids)
    train_q = [q for q in train_q if q.image_id in chosen]
    all_test_q = load_questions("test")
    test_q = _held_out(all_test_q, cfg.test_questions, rng)
    test_ids = sorted({q.image_id for _, q in test_q})
    test_notes = annotate([q for q in all_test_q if q.image_id in set(test_ids)])

    os.makedirs(out, exist_ok=True)
    stage1 = [_caption_sample(i, notes[i]) for i in train_ids if notes[i].complete]
    yes_no, open_ = [], []
    groups = _conversations(_stage2_questions(train_q, cfg, rng), cfg, rng)
    for group in groups:
        sample = _qa_sample(f"train-q{group[0][0]}", [q for _, q in group], "train")
        (yes_no if group[0][1].type == "yes/no" else open_).append(sample)
    stage2 = yes_no + open_
    drills = _text_drills(train_q, notes, cfg.text_yes_no, rng)
    for part in (yes_no, open_, drills):
        rng.shuffle(part)
    files = {"stage1.json": stage1, "stage2_yes_no.json": yes_no, "stage2_open.json": open_}
    files["stage2_text.json"] = drills
    manifest = {
        "source": "easy-vqa (PyPI)",
        "settings": asdict(cfg),
        "stage1": {"samples": len(stage1), "images_without_full_annotation": len(train_ids) - len(stage1)},
        "stage2": _counts(stage2) | {"text_drills": len(drills), "turns": _turn_counts(stage2)},
    }
    for name, split, questions, split_notes in (
        ("val", "train", val_q, notes),
        ("test", "test", test_q, test_notes),
    ):
        ids = sorted({q.image_id for _, q in questions})
        single = [_qa_sample(f"{name}-q{n}", [q], split) | {"question_type": q.type} for n, q in questions]
        turns = _turn_items(questions, name, split, rng)
        captions = [_caption_sample(i, split_notes[i], split) for i in ids if split_notes[i].complete]
        files |= {f"{name}.json": single, f"{name}_turns.json": turns, f"{name}_captions.json": captions}
        manifest[name] = _counts(single) | {
            "images": len(ids),
            "turns": dict(Counter(t["question_type"] for t in turns)),
        }
        manifest[f"{name}_captions"] = {"samples": len(captions)}
    _copy_images("train", sorted(chosen | set(val_ids)), out)
    _copy_images("test", test_ids, out)
    for name, rows in (*files.items(), ("manifest.json", manifest)):
        _write_json(os.path.join(out, name), rows)
    return manifest


def _held_out(questions: list[Question], at_least: int, rng: random.Random) -> list[tuple[int, Question]]:
    """All questions (with their index in the split) of random test images, until there are `at_least`.

    Whole images, not scattered questions: the frozen tower then encodes ~100 images, not ~1,000.
    """
    by_image: dict[int, list[tuple[int, Question]]] = defaultdict(list)
    for n, q in enumerate(questions):
        by_image[q.image_id].append((n, q))
    picked: list[tuple[int, Question]] = []
    for image_id in rng.sample(sorted(by_image), len(by_image)):
        if len(picked) >= at_least:
            break
        picked.extend(by_image[image_id])
    return picked


def _stage2_questions(
    questions: list[Question], cfg: DemoData, rng: random.Random
) -> list[tuple[int, Question]]:
    indexed = list(enumerate(questions))
    if not cfg.balance_yes_no:
        return indexed
    groups: dict[tuple, list[tuple[int, Question]]] = defaultdict(list)
    kept = []
    for n, q in indexed:
        if q.type == "yes/no":
            groups[(q.negated, q.asks_about, q.answer)].append((n, q))
        else:
            kept.append((n, q))
    for negated in (False, True):
        for about in ("color", "shape"):
            yes, no = groups[(negated, about, "yes")], groups[(negated, about, "no")]
            k = min(len(yes), len(no))
            kept += rng.sample(yes, k) + rng.sample(no, k)
    return sorted(kept, key=lambda item: item[0])


def _conversations(
    questions: list[tuple[int, Question]], cfg: DemoData, rng: random.Random
) -> list[list[tuple[int, Question]]]:
    """Every question once, in conversations: questions about one image, shuffled, in runs of one (or, for a
    `multi_turn` share, 2..questions_per_sample); a `switch` share of the runs is followed by the next run,
    about another image. A conversation holds either yes/no or open (colour, shape) questions, never both, so
    that each lands in its own source."""
    by_image: dict[tuple[bool, int], list[tuple[int, Question]]] = defaultdict(list)
    for item in questions:
        by_image[item[1].type == "yes/no", item[1].image_id].append(item)
    runs: dict[bool, list[list[tuple[int, Question]]]] = defaultdict(list)
    for key in sorted(by_image):
        items = by_image[key]
        rng.shuffle(items)
        while items:
            size = 1
            if rng.random() < cfg.multi_turn:
                size = rng.randint(2, cfg.questions_per_sample)
            runs[key[0]].append(items[:size])
            items = items[size:]
    groups = []
    for kind in sorted(runs):
        queue = runs[kind]
        rng.shuffle(queue)
        while queue:
            group = queue.pop()
            if queue and rng.random() < cfg.switch and queue[-1][0][1].image_id != group[0][1].image_id:
                group = group + queue.pop()
            groups.append(group)
    return sorted(groups, key=lambda g: g[0][0])


def _turn_items(
    questions: list[tuple[int, Question]], prefix: str, split: str, rng: random.Random
) -> list[dict]:
    """Each question once more, as a later turn: an image's questions, shuffled, in chains of three score the
    second (`turn 2`) and third (`turn 3`) with the earlier ones and their true answers before them; each
    chain's first question is asked right after a turn about another image (`after switch`)."""
    by_image: dict[int, list[tuple[int, Question]]] = defaultdict(list)
    for item in questions:
        by_image[item[1].image_id].append(item)
    images = sorted(by_image)
    if len(images) < 2:
        raise ValueError(
            f"{prefix}: the switch items need questions about at least 2 images, got {len(images)}"
        )
    items = []
    for k, image_id in enumerate(images):
        chain_items = by_image[image_id][:]
        rng.shuffle(chain_items)
        other = by_image[images[(k + 1) % len(images)]]
        for c in range(0, len(chain_items), 3):
            chain = [q for _, q in chain_items[c : c + 3]]
            n = chain_items[c][0]
            before = rng.choice(other)[1]
            items.append(
                _qa_sample(f"{prefix}-q{n}-switch", [before, chain[0]], split)
                | {"question_type": "after switch"}
            )
            for turn in range(2, len(chain) + 1):
                n = chain_items[c + turn - 1][0]
                sample = _qa_sample(f"{prefix}-q{n}-turn{turn}", chain[:turn], split)
                items.append(sample | {"question_type": f"turn {turn}"})
    return items


def _text_drills(
    questions: list[Question], notes: dict[int, Annotation], share: float, rng: random.Random
) -> list[dict]:
    """`share` of the yes/no questions once more, about the caption of a training image that makes the answer
    yes or no (each at random, so 50/50 for every wording): the comparison on words, without an image."""
    if share <= 0:
        return []
    captions = [note for _, note in sorted(notes.items()) if note.complete]
    drills = []
    by_answer: dict[tuple[str, str], list[Annotation]] = {}  # (question, answer) → captions that give it
    for n, q in enumerate(questions):
        if q.type != "yes/no" or rng.random() >= share:
            continue
        want = rng.choice(("yes", "no"))
        if (q.question, want) not in by_answer:
            answers = {note: q.answer_for(note) for note in set(captions)}  # a few dozen distinct captions
            for a in ("yes", "no"):
                by_answer[q.question, a] = [note for note in captions if answers[note] == a]
        note = rng.choice(by_answer[q.question, want])
        drills.append(
            {
                "id": f"train-q{n}-text",
                "conversations": [
                    {"from": "human", "value": f"{note.caption()}\n{q.question}"},
                    {"from": "gpt", "value": want},
                ],
            }
        )
    return drills


def _image_path(split: str, image_id: int) -> str:
    return f"images/{split}/{image_id}.png"


def _caption_sample(image_id: int, note: Annotation, split: str = "train") -> dict:
    return {
        "id": f"{split}-img{image_id}",
        "image": _image_path(split, image_id),
        "conversations": [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{CAPTION_PROMPT}"},
            {"from": "gpt", "value": note.caption()},
        ],
    }


def _qa_sample(sample_id: str, questions: list[Question], split: str) -> dict:
    """One conversation: its questions in turn, each image in the first turn about it (a later `<image>` is
    a switch); `image` is a list when there are several."""
    turns, images = [], []
    for q in questions:
        path = _image_path(split, q.image_id)
        new = not images or images[-1] != path
        images += [path] if new else []
        prompt = f"{IMAGE_PLACEHOLDER}\n{q.question}" if new else q.question
        turns += [{"from": "human", "value": prompt}, {"from": "gpt", "value": q.answer}]
    return {"id": sample_id, "image": images[0] if len(images) == 1 else images, "conversations": turns}


def _copy_images(split: str, image_ids: list[int], out: str) -> None:
    paths = image_paths(split)
    os.makedirs(os.path.join(out, "images", split), exist_ok=True)
    for i in image_ids:
        dst = os.path.join(out, _image_path(split, i))
        if not os.path.exists(dst):
            shutil.copyfile(paths[i], dst)


def _counts(samples: list[dict]) -> dict:
    by_type: dict[str, int] = defaultdict(int)
    answers: dict[str, int] = defaultdict(int)
    for s in samples:
        for turn in s["conversations"][1::2]:
            by_type[question_type(turn["value"])] += 1
            answers[turn["value"]] += 1
    return {
        "samples": len(samples),
        "questions": sum(by_type.values()),
        "by_type": dict(sorted(by_type.items())),
        "answers": dict(sorted(answers.items())),
    }


def _turn_counts(samples: list[dict]) -> dict:
    """How many conversations have 1, 2, … questions, and how many switch image."""
    sizes = Counter(len(s["conversations"]) // 2 for s in samples)
    switches = sum(isinstance(s["image"], list) for s in samples)
    return {"questions_per_conversation": dict(sorted(sizes.items())), "with_switch": switches}


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
