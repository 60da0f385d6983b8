"""Pytester project texts that several plugin suites run (no pytest import).

``BASE_CONFTEST`` defines the one-layer image ``base`` (``/etc/os-release`` = ``ID=demo``);
``BASE_TESTS`` is a test module with one passing test on that image.
"""

from __future__ import annotations

BASE_CONFTEST = """
from pytest_layers import layer

@layer
def base(root):
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=demo\\n")
"""

BASE_TESTS = """
import pytest

@pytest.mark.layer("base")
def test_it(rootfs):
    assert (rootfs / "etc/os-release").read_text() == "ID=demo\\n"
"""
