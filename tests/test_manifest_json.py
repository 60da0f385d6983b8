"""``files.json`` is written without json's per-record key sort; its bytes must not change
(``test_store_digests`` pins them for a real tree; here every shape of record and name)."""

from __future__ import annotations

import json
import os
from typing import Any

from pytest_layers._layerindex import manifest_json


def _file(**more: Any) -> dict[str, Any]:
    rec = {"type": "file", "mode": 0o644, "uid": 0, "gid": 0, "mtime": 315532800}
    return {**rec, "size": 10, "sha256": "ab" * 32, **more}


def test_manifest_json_is_json_dumps_sorted_and_compact() -> None:
    manifest: dict[str, dict[str, Any]] = {
        "z": _file(),
        "a": {"type": "dir", "mode": 0o755, "uid": 1000, "gid": 1001, "mtime": 0},
        "a/x": {
            "type": "dir",
            "mode": 0o700,
            "uid": 0,
            "gid": 0,
            "mtime": 5,
            "xattrs": {"user.b": "1", "user.a": "2"},
        },
        'q"uote\\s\n': _file(uid=2**40, gid=3, mtime=-1, size=0),
        "caf\xe9/\u4e2d/\U0001f600": _file(link_group="z"),
        os.fsdecode(b"raw\xff"): _file(xattrs={"user.k": "00"}),
        "l": {
            "type": "symlink",
            "mode": 0o777,
            "uid": 0,
            "gid": 0,
            "mtime": 1,
            "target": "../\xe9",
        },
        "d": {"type": "chardev", "mode": 0o666, "uid": 0, "gid": 0, "mtime": 1, "rdev": [1, 3]},
        "f": {"type": "fifo", "mode": 0o640, "uid": 0, "gid": 0, "mtime": 1},
        "u": {"type": "unknown", "mode": 0, "uid": 0, "gid": 0, "mtime": 1},
        # A record shaped as a file's but in another key order than _record makes.
        "o": dict(reversed(list(_file().items()))),
    }
    assert manifest_json(manifest) == json.dumps(manifest, separators=(",", ":"), sort_keys=True)
    assert manifest_json({}) == "{}"
