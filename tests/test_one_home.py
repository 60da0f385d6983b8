"""The small rules that several modules share, each kept in one module: process tags, the
mount table, the size and digest formatting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_layers import _fmt, _mounts, _proctag, namespaces, store


def test_a_tag_names_this_process_and_says_it_is_alive() -> None:
    pid, start = _proctag.parse(_proctag.tag()) or (0, 0)
    assert pid == os.getpid()
    assert _proctag.alive(pid, start)
    assert _proctag.tag(os.getpid()) == _proctag.tag()


def test_a_tag_of_a_dead_or_recycled_pid_is_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    tag = _proctag.tag(child.pid)
    child.wait()
    assert not _proctag.alive(*(_proctag.parse(tag) or (0, 0)))
    # The same pid with another start time: a process that is not the one that made the tag.
    pid, start = _proctag.parse(_proctag.tag()) or (0, 0)
    assert not _proctag.alive(pid, start - 50_000)


def test_tags_of_earlier_releases_in_whole_seconds_are_understood() -> None:
    import psutil  # type: ignore[import-untyped]

    seconds = int(psutil.Process(os.getpid()).create_time())
    assert _proctag.alive(os.getpid(), seconds)
    assert _proctag.owner_alive(f"{os.getpid()}-{seconds}-staging-ab12")


def test_parse_wants_the_whole_tag() -> None:
    assert _proctag.parse("12-34") == (12, 34)
    assert _proctag.parse("12-34-lease-x") == (12, 34)
    assert _proctag.parse("12-34x") is None
    assert _proctag.parse("views") is None
    assert namespaces.parse_session_dir_name("12-34-x") is None
    assert namespaces.parse_session_dir_name("12") == (12, None)


def test_each_place_keeps_the_unit_earlier_releases_read_there(tmp_path: Path) -> None:
    """A store and its scratch may be shared with sessions of an earlier release, which would
    take a tag in another unit for a dead owner's and sweep what it is still writing."""
    st = store.Store(tmp_path / "store")
    with st.staging() as staging:
        assert staging.parent.name.startswith(_proctag.store_tag() + "-stage-")
    seconds = int(_proctag.store_tag().split("-")[1])
    hundredths = int(namespaces.session_dir_name().split("-")[1])
    assert seconds == hundredths // 100
    assert _proctag.owner_alive(staging.parent.name)


def test_a_second_of_boot_time_skew_between_processes_is_allowed() -> None:
    pid, start = _proctag.parse(_proctag.tag()) or (0, 0)
    assert _proctag.alive(pid, start + 100)
    assert _proctag.alive(pid, start - 100)
    assert not _proctag.alive(pid, start - 300)


def test_the_mount_table_unescapes_paths_and_tells_filesystem_types(tmp_path: Path) -> None:
    assert _mounts.filesystem_type(Path("/proc")) == "proc"
    assert _mounts._unescape_mountinfo(r"/a\040b\134c") == "/a b\\c"
    root = _mounts.mount_at(Path("/"))
    assert root is not None
    assert root.device.count(":") == 1
    assert namespaces.mountinfo is _mounts.mountinfo  # one parser, reached by both names


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536 << 20, "1.5 GiB"),
        (3 << 40, "3.0 TiB"),
    ],
)
def test_human_size(n: int, text: str) -> None:
    assert _fmt.human_size(n) == text


def test_short_digest() -> None:
    assert _fmt.short_digest("sha256:" + "ab" * 32) == "ab" * 6
    assert _fmt.short_digest("cd" * 32) == "cd" * 6
