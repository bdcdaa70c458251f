"""`file_fingerprint`: the one file/folder fingerprint (content for data, size + mtime for tower weights)."""

from __future__ import annotations

import os

import mllm.fingerprint as fp
from mllm.fingerprint import file_fingerprint


def test_content_fingerprint_follows_the_bytes_not_the_place(tmp_path):
    a = tmp_path / "a" / "data.json"
    a.parent.mkdir()
    a.write_text('{"x": 1}')
    b = tmp_path / "b" / "data.json"
    b.parent.mkdir()
    b.write_text('{"x": 1}')
    assert (
        file_fingerprint(a) == file_fingerprint(b) == file_fingerprint(a.parent)
    )  # moved data is the same data
    b.write_text('{"x": 2}')  # same size, other bytes
    assert file_fingerprint(a) != file_fingerprint(b)
    os.utime(a, ns=(1, 1))
    assert file_fingerprint(a) == file_fingerprint(a.parent / "data.json")


def test_stamp_fingerprint_sees_a_rewrite_to_the_nanosecond_and_only_the_named_files(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w" * 10)
    stamp = lambda: file_fingerprint(tmp_path, content=False, mtime=True, suffixes=(".safetensors",))  # noqa: E731
    before = stamp()
    (tmp_path / "README.md").write_text("not a weight file")
    assert stamp() == before
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert stamp() != before


def test_a_large_file_is_sampled(tmp_path, monkeypatch):
    monkeypatch.setattr(fp, "FULL_HASH_BYTES", 1 << 20)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(4 << 20))
    before = file_fingerprint(big)
    with open(big, "r+b") as f:  # the last byte is inside the last sampled block
        f.seek(-1, os.SEEK_END)
        f.write(b"\1")
    assert file_fingerprint(big) != before
