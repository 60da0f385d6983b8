"""Report header, --layers-store, --layers-verify."""

from __future__ import annotations

import os

import pytest

from tests.plugin_util import BASE_CONFTEST, BASE_TESTS

pytestmark = [pytest.mark.requires_overlay]


@pytest.mark.slow
def test_header_store_and_verify(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(BASE_CONFTEST)
    pytester.makepyfile(test_r=BASE_TESTS)
    # Run as an ordinary user (CI's second pass), the kernel overlay is mounted in a user
    # namespace, and the header says so.
    label = "overlay" if os.geteuid() == 0 else "overlay (user namespace)"
    result = pytester.runpytest_subprocess("--layers-store=my-store")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [f"layers: backend={label}, store={pytester.path}/my-store (yours, * disk use)"]
    )
    result = pytester.runpytest_subprocess("--layers-store=my-store", "--layers-verify")
    result.assert_outcomes(passed=1)
    # Disk use, as du counts it (blocks), not the 8 bytes of the layer's one file.
    result.stdout.fnmatch_lines(
        [f"layers: backend={label}, store=*/my-store (yours, *KiB disk use)"]
    )

    # Tamper with the stored layer: --layers-verify refuses to use it.
    stored = next((pytester.path / "my-store" / "layers").glob("*/diff/etc/os-release"))
    stored.write_text("ID=evil\n")
    result = pytester.runpytest_subprocess("--layers-store=my-store", "--layers-verify")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--layers-verify: 1 problem(s) in the store*"])
    # Without it, the (damaged) cache is used as is: verification is opt-in.
    pytester.runpytest_subprocess("--layers-store=my-store").assert_outcomes(failed=1)
