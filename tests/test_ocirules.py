"""The OCI rules of a layer directory, kept in one module: whiteout names, flavors, xattrs."""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace
from typing import cast

import pytest

from pytest_layers import _ocirules


def test_whiteout_names() -> None:
    assert _ocirules.whiteout_name("etc") == ".wh.etc"
    assert _ocirules.whiteout_target(".wh.etc") == "etc"
    assert _ocirules.whiteout_target(_ocirules.OPAQUE_MARKER) is None
    assert _ocirules.whiteout_target("etc") is None
    assert _ocirules.is_whiteout_name(".wh..wh..opq")
    assert not _ocirules.is_whiteout_name("wh.etc")


def test_whiteout_device_is_a_0_0_character_device() -> None:
    def st(mode: int, rdev: int) -> os.stat_result:
        return cast(os.stat_result, SimpleNamespace(st_mode=mode | 0o600, st_rdev=rdev))

    assert _ocirules.is_whiteout_device(st(stat.S_IFCHR, 0))
    assert not _ocirules.is_whiteout_device(st(stat.S_IFCHR, os.makedev(1, 3)))
    assert not _ocirules.is_whiteout_device(st(stat.S_IFREG, 0))


def test_flavors() -> None:
    assert _ocirules.check_flavor("marker") == "marker"
    with pytest.raises(ValueError, match="unknown whiteout flavor 'aufs'; expected 'overlay'"):
        _ocirules.check_flavor("aufs")


@pytest.mark.parametrize(
    ("name", "layer", "view"),
    [
        ("user.mime", True, True),
        ("security.capability", True, True),
        ("user.overlay.opaque", False, False),
        ("user.fuseoverlayfs.opaque", False, False),
        ("trusted.overlay.opaque", False, False),
        # A view shows what an overlay mount shows; a layer never carries trusted.*.
        ("trusted.md5", False, True),
        ("security.selinux", False, True),
    ],
)
def test_the_xattr_policy(name: str, layer: bool, view: bool) -> None:
    assert _ocirules.layer_keeps_xattr(name) is layer
    assert _ocirules.view_shows_xattr(name) is view
    assert _ocirules.layer_never_carries(name) is (
        name.startswith(("trusted.", "user.overlay.", "user.fuseoverlayfs."))
    )


def test_every_module_uses_the_one_home() -> None:
    """No engine module spells a whiteout or the xattr policy on its own any more."""
    import pathlib
    import re

    pkg = pathlib.Path(_ocirules.__file__).parent
    offenders = []
    for path in sorted(pkg.rglob("*.py")):
        if path.name == "_ocirules.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"""b?["']\.wh\.(?!')""", code) or "_SKIPPED_XATTR_PREFIXES" in code:
                offenders.append(f"{path.relative_to(pkg)}:{n}: {line.strip()}")
    assert offenders == []
