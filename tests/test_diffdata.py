"""diffdata without mounts: detailed entries and the report's unified diff, from a plain tree
compared with an image of plain layer directories."""

from __future__ import annotations

import os
from pathlib import Path

from pytest_layers import changeset, diffdata


def _entries(lower: Path, new: Path) -> tuple[list[changeset.Entry], changeset.ImageView]:
    image = changeset.ImageView([lower], "overlay")
    return changeset.changes_from_tree(new, image), image


def test_unified_is_bounded_and_names_the_rest(tmp_path: Path) -> None:
    lower, new = tmp_path / "lower", tmp_path / "new"
    lower.mkdir()
    new.mkdir()
    (lower / "was_dir").mkdir()  # a directory in the image, a file now
    for i in range(30):
        (lower / f"gone{i:02d}.txt").write_text("x\n")
    (lower / "big.txt").write_text("a\n" * 10)
    (new / "big.txt").write_text("b\n" * 10)
    (new / "was_dir").write_text("now a file\n")
    (new / "fifo").parent.mkdir(exist_ok=True)
    os.mkfifo(new / "fifo")  # not a regular file: never opened for reading (would block)
    entries, image = _entries(lower, new)
    with image:
        text = diffdata.unified(entries, image, max_files=1, max_lines=5)
    lines = text.splitlines()
    assert lines[:5] == ["--- a/big.txt", "+++ b/big.txt", "@@ -1,10 +1,10 @@", "-a", "-a"]
    assert lines[5] == "... (18 more lines)"
    # Past max_files, the rest is named; past 4 x max_files names, counted.
    assert lines[6:10] == ["deleted /gone00.txt", "deleted /gone01.txt", "deleted /gone02.txt",
                           "deleted /gone03.txt"]  # fmt: skip
    assert lines[10] == "... and 27 more changed or deleted paths"
    assert len(lines) == 11


def test_a_directory_that_became_a_file_diffs_against_nothing(tmp_path: Path) -> None:
    lower, new = tmp_path / "lower", tmp_path / "new"
    (lower / "x").mkdir(parents=True)
    new.mkdir()
    (new / "x").write_text("now a file\n")
    entries, image = _entries(lower, new)
    with image:
        text = diffdata.unified(entries, image)
        details = diffdata.details(entries)
    assert text.splitlines() == ["--- /dev/null", "+++ b/x", "@@ -0,0 +1 @@", "+now a file"]
    assert [e.to_dict() for e in details if e.path == "/x"] == [
        {"kind": "C", "path": "/x", "type": "file", "mode": "0644", "size": 11,
         "digest": "sha256:" + __import__("hashlib").sha256(b"now a file\n").hexdigest()}
    ]  # fmt: skip
