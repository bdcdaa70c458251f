"""A hostile data corpus: a recipe whose sources mix good samples with every kind of bad one, and the verdict
each must get. Built fresh by the tests in a temporary folder; nothing is checked in.

Layout under `folder`:
    etc/passwd            a sentinel a `../../etc/passwd` reference would reach if it were followed
    outside/              files outside the image root (targets of an absolute path and of symlinks)
    corpus/images/        the image root: valid unusual images, broken ones, symlinks pointing outside
    corpus/good.jsonl     valid samples, one per unusual image (plus plain ones)
    corpus/hostile.jsonl  one bad sample per line (JSONL: a broken line is one bad sample)
    corpus/recipe.yaml    both sources, on_bad_sample: skip
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from hostile.images import write_hostile, write_valid

MAX_LENGTH = 96
IMAGE_TOKENS = 4
MAX_IMAGE_PIXELS = 50_000_000  # below the 12,000² bomb, above every honest test image


def turns(question: str = "<image>\nWhat is shown?", answer: str = "Four coloured squares.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@dataclass
class Corpus:
    folder: Path
    recipe: Path
    image_root: Path
    outside: list[Path]
    """Files outside the image root that hostile samples point at: none may ever be opened."""
    expected_bad: dict[str, str] = field(default_factory=dict)
    """Sample id → bad-sample kind. Unparsable lines have no id: keyed `line:N` (JSONL line of hostile.jsonl)."""
    valid_images: dict[str, tuple] = field(default_factory=dict)
    """Image file name → (RGB pixels it must load as, tolerance)."""
    good_ids: list[str] = field(default_factory=list)
    found_when_loading: set[str] = field(default_factory=set)
    """Bad samples whose text is fine: only opening their image finds the problem (in `__getitem__`)."""


def hostile_lines(corpus: Corpus, bad_images: dict[str, str]) -> list[bytes]:
    """The hostile JSONL lines; fills `corpus.expected_bad`."""
    lines: list[bytes] = []

    def add(sid: str | None, kind: str, record=None, raw: bytes | None = None) -> None:
        if raw is None:
            raw = json.dumps({"id": sid, **record}).encode()
        lines.append(raw)
        corpus.expected_bad[sid if sid is not None else f"line:{len(lines)}"] = kind

    def at_load(sid: str, kind: str, record: dict) -> None:
        add(sid, kind, record)
        corpus.found_when_loading.add(sid)

    for name, kind in bad_images.items():
        at_load(f"img-{name}", kind, {"image": name, "conversations": turns()})
    outside_png = corpus.outside[1]
    at_load("dotdot-passwd", "unsafe_image_path", {"image": "../../etc/passwd", "conversations": turns()})
    at_load(
        "dotdot-nested",
        "unsafe_image_path",
        {"image": "sub/../../outside/real.png", "conversations": turns()},
    )
    at_load("absolute-outside", "unsafe_image_path", {"image": str(outside_png), "conversations": turns()})
    at_load("absolute-passwd", "unsafe_image_path", {"image": "/etc/passwd", "conversations": turns()})
    at_load("symlink-file", "unsafe_image_path", {"image": "escape.png", "conversations": turns()})
    at_load("symlink-dir", "unsafe_image_path", {"image": "escape_dir/real.png", "conversations": turns()})
    at_load("nul-byte", "bad_image_path", {"image": "ok.png\u0000.jpg", "conversations": turns()})
    at_load("missing", "missing_image", {"image": "nowhere.png", "conversations": turns()})
    add("url", "bad_image_path", {"image": "http://example.com/cat.png", "conversations": turns()})

    add(
        None,
        "invalid_json",
        raw=b'{"id": "bad-utf8", "conversations": [{"from": "human", "value": "caf\xe9 \xff"}]}',
    )
    add(None, "invalid_json", raw=b'{"id": "broken", "conversations": [')
    add(None, "invalid_json", raw=b"[" * 50_000 + b"]" * 50_000)  # nesting deeper than any parser recursion
    add(
        None, "invalid_json", raw=b'{"id": ' + b"9" * 5000 + b', "conversations": []}'
    )  # int too long to parse
    add(None, "invalid_record", raw=b'["a", "list", "not", "an", "object"]')
    add("conv-string", "invalid_record", {"conversations": "human: hi\ngpt: hello"})
    add("conv-missing", "invalid_record", {"image": "ok.png"})
    add("turn-null", "invalid_record", {"conversations": [None, {"from": "gpt", "value": "hi"}]})
    add(
        "value-int",
        "bad_content",
        {"conversations": [{"from": "human", "value": 42}, {"from": "gpt", "value": "x"}]},
    )
    add("image-int", "invalid_record", {"image": 7, "conversations": turns()})
    add(
        "from-list",
        "unknown_role",
        {"conversations": [{"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "x"}]},
    )

    many = "<image>" * 10_000 + "\nWhich is odd?"
    add("10k-placeholders-1-image", "image_count_mismatch", {"image": "ok.png", "conversations": turns(many)})
    add(
        "10k-placeholders-10k-images",
        "images_do_not_fit",
        {"image": ["ok.png"] * 10_000, "conversations": turns(many)},
    )
    add("1mb-question", "answer_truncated", {"conversations": turns("word " * 200_000 + "?")})
    add("empty-conversation", "empty_conversation", {"conversations": []})
    add("no-answer", "no_assistant_turn", {"conversations": [{"from": "human", "value": "hi"}]})
    add("empty-answer", "empty_answer", {"conversations": turns("hi", " ")})
    add(
        "role-robot",
        "unknown_role",
        {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
    )
    add(
        "role-empty",
        "unknown_role",
        {"conversations": [{"from": "", "value": "hi"}, {"from": "gpt", "value": "x"}]},
    )
    return lines


def good_records(corpus: Corpus) -> list[dict]:
    records = []
    for name in corpus.valid_images:
        records.append({"id": f"good-{name}", "image": name, "conversations": turns()})
    records.append({"id": "good-plain", "image": "ok.png", "conversations": turns()})
    records.append({"id": "good-text-only", "conversations": turns("Say hi.", "Hi.")})
    records.append(
        {"id": "good-1mb-answer", "conversations": turns("Talk.", "la " * 350_000)}
    )  # kept, truncated
    corpus.good_ids = [r["id"] for r in records]
    return records


def write_corpus(folder: Path, on_bad_sample: str = "skip") -> Corpus:
    folder = Path(folder)
    root = folder / "corpus" / "images"
    (folder / "etc").mkdir(parents=True)
    (folder / "etc" / "passwd").write_text("root:x:0:0:sentinel:/root:/bin/sh\n")
    (folder / "outside").mkdir()
    Image.new("RGB", (8, 8), "blue").save(
        folder / "outside" / "real.png"
    )  # a valid image: refusal must matter
    corpus = Corpus(
        folder,
        folder / "corpus" / "recipe.yaml",
        root,
        [folder / "etc" / "passwd", folder / "outside" / "real.png"],
    )
    corpus.valid_images = write_valid(root)
    bad_images = write_hostile(root)
    Image.new("RGB", (8, 8), "red").save(root / "ok.png")
    (root / "sub").mkdir()
    os.symlink(folder / "outside" / "real.png", root / "escape.png")
    os.symlink(folder / "outside", root / "escape_dir")

    (folder / "corpus" / "hostile.jsonl").write_bytes(b"\n".join(hostile_lines(corpus, bad_images)) + b"\n")
    with open(folder / "corpus" / "good.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in good_records(corpus))
    corpus.recipe.write_text(
        f"name: hostile\nimage_root: images\ntemplate: llama3\nmax_length: {MAX_LENGTH}\n"
        f"max_image_pixels: {MAX_IMAGE_PIXELS}\non_bad_sample: {on_bad_sample}\ncache_dir: none\n"
        "sources:\n  - path: good.jsonl\n  - path: hostile.jsonl\n"
    )
    return corpus
