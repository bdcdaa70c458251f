"""`mllm chat`: the REPL through a real pseudo-terminal (streaming, two turns, image switch, /reset), one-shot, errors."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
from helpers import make_checkpoint, make_image, never_stop


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, backbones):
    from mllm.config import ConnectorConfig, LLMConfig, ModelConfig, VisionConfig

    cfg = ModelConfig(
        vision=VisionConfig(path=backbones["clip"]),
        connector=ConnectorConfig(kind="mlp"),
        llm=LLMConfig(path=backbones["llama"], mode="full"),
        dtype="fp32",
    )
    return make_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt", cfg, seed=1, edit=never_stop)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(2):
        make_image(10 + i).save(d / f"img{i}.png")
        paths.append(str(d / f"img{i}.png"))
    (d / "notes.png").write_text("not an image")
    return paths, str(d / "notes.png")


def _reply_with_timing(child, timeout: float = 120) -> tuple[str, float, float]:
    """Read until the next prompt: the text, seconds from the first answer text to the prompt, seconds in all."""
    text, sent, first = "", time.monotonic(), None
    while not text.endswith(">>> "):
        assert time.monotonic() - sent < timeout, f"no prompt after: {text!r}"
        try:
            chunk = child.read_nonblocking(4096, timeout=1)
        except Exception as e:  # pexpect.TIMEOUT: keep waiting until the deadline
            if type(e).__name__ != "TIMEOUT":
                raise
            continue
        text += chunk
        if first is None and text.split("\n", 1)[-1].strip():  # past the echoed input line
            first = time.monotonic()
    done = time.monotonic()
    return text, done - first, done - sent


@pytest.mark.slow
def test_repl_two_turns_image_switch_reset_and_streaming(ckpt, images, tmp_path):
    import pexpect

    from mllm.inference import ChatSession, SamplingConfig, load_pretrained

    (img0, img1), _ = images
    env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    args = ["-m", "mllm", "chat", ckpt, "--image", img0, "--max-new-tokens", "24"]
    child = pexpect.spawn(
        sys.executable, args, env=env, encoding="utf-8", codec_errors="replace", timeout=120
    )
    try:
        child.expect("/help for commands")
        child.expect_exact(">>> ")
        child.sendline("What shape is in the image?")
        reply, streamed_for, total = _reply_with_timing(child)
        # The first words are on screen while most of the answer is still being generated (printed at
        # the end, the whole answer would land within a millisecond of the next prompt).
        assert streamed_for > 0.5 * total, f"answer on screen {streamed_for:.3f}s of {total:.3f}s: {reply!r}"
        child.sendline(f"/image {img1}")
        child.expect("1 pending")
        child.expect_exact(">>> ")
        child.sendline("What color is the shape?")
        _reply_with_timing(child)
        child.sendline(f"/save {tmp_path / 'two.json'}")
        child.expect("transcript saved")
        child.expect_exact(">>> ")
        child.sendline("/reset")
        child.expect("conversation reset")
        child.expect_exact(">>> ")
        child.sendline(f"/image {img0}")
        child.expect_exact(">>> ")
        child.sendline("What shape is in the image?")
        _reply_with_timing(child)
        child.sendline(f"/save {tmp_path / 'after_reset.json'}")
        child.expect("transcript saved")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    two = json.loads((tmp_path / "two.json").read_text())["turns"]
    after = json.loads((tmp_path / "after_reset.json").read_text())["turns"]
    assert [t["images"] for t in two] == [[img0], [], [img1], []]
    assert len(after) == 2 and after[0] == two[0]

    # The REPL answers exactly what the Python API answers for the same conversation.
    model, processor = load_pretrained(ckpt)
    session = ChatSession(model, processor, SamplingConfig(max_new_tokens=24))
    session.attach(img0)
    first = session.ask("What shape is in the image?")
    session.attach(img1)
    second = session.ask("What color is the shape?")
    assert [two[1]["content"], two[3]["content"]] == [first, second]
    assert after[1]["content"] == first, "after /reset the first turn is answered as in a fresh conversation"
    assert first != second


def test_one_shot_prints_only_the_answer_and_json(ckpt, images, capsys):
    from mllm.cli import main

    (img0, img1), _ = images
    assert main(["chat", ckpt, "--image", img0, "--prompt", "What shape?", "--max-new-tokens", "8"]) == 0
    plain = capsys.readouterr().out
    assert (
        main(["chat", ckpt, "--image", img0, "--prompt", "What shape?", "--max-new-tokens", "8", "--json"])
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert plain == record["answer"] + "\n" and record["answer"]
    assert record["images"] == [img0] and record["prompt"] == "What shape?"
    assert record["sampling"] == {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0}


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_ckpt", "no such checkpoint directory"),
        ("missing_image", "no such image file"),
        ("not_image", "not an image"),
    ],
)
def test_bad_inputs_get_one_clear_line(ckpt, images, tmp_path, capsys, case, message):
    from mllm.cli import main

    (img0, _), not_image = images
    argv = {
        "missing_ckpt": ["chat", str(tmp_path / "nope"), "--prompt", "hi"],
        "missing_image": ["chat", ckpt, "--image", str(tmp_path / "gone.png"), "--prompt", "hi"],
        "not_image": ["chat", ckpt, "--image", not_image, "--prompt", "hi"],
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_chat_images_load_like_training_images(tmp_path):
    """EXIF-rotated and 16-bit images reach the model upright and with their real values, as in training."""
    import numpy as np
    from PIL import Image

    from mllm.inference.images import load_image

    wide = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    wide.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert load_image(tmp_path / "grey16.png").getpixel((0, 0)) == (128, 128, 128)
