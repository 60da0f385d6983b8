"""MkDocs hook: fill generated parts of pages at build time.

- ``<!-- cli-help -->`` becomes the ``--help`` text of every ``pytest-layers`` verb, taken from
  the parser itself so the reference cannot drift from the command.
- ``<!-- benchmarks-table -->`` becomes tables rendered from ``docs/assets/benchmarks.json``, the
  file ``benchmarks/bench_compare.py`` writes, so the page shows exactly the committed results.

A missing module or results file raises, which fails the (strict) build loudly.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

_DOCS = Path(__file__).resolve().parent.parent


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if "<!-- cli-help -->" in markdown:
        markdown = markdown.replace("<!-- cli-help -->", _cli_help())
    if "<!-- benchmarks-table -->" in markdown:
        results = _DOCS / "assets" / "benchmarks.json"
        if not results.is_file():
            raise PluginError(
                f"{page.file.src_uri}: {results} is missing; run "
                "`python benchmarks/bench_compare.py` to produce it"
            )
        data = json.loads(results.read_text())
        markdown = markdown.replace("<!-- benchmarks-table -->", benchmark_tables(data))
    return markdown


# -- CLI ----------------------------------------------------------------------------------------


def _cli_help() -> str:
    from pytest_layers.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; pin it for stable output
    parser = build_parser()
    parts = [_fence(parser.format_help())]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                parts.append(f"### `{verb}`\n\n{_fence(sub.format_help())}")
    return "\n\n".join(parts)


def _fence(text: str) -> str:
    return f"```text\n{text.rstrip()}\n```"


# -- benchmarks ---------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = [_row(head), _row(["---"] * len(head))]
    lines += [_row(r) for r in rows]
    return "\n".join(lines)


def benchmark_tables(data: dict[str, Any]) -> str:
    out: list[str] = []
    m = data["machine"]
    out.append(
        "Measured "
        + data.get("created", "")
        + f" in `{data['mode']}` mode on: {m['cpu']} ({m['cores']} cores), Linux "
        + f"{m['kernel']}, {m['python']}, work directory on {m['filesystem']}, "
        + ("as root" if m.get("uid") == 0 else "as an ordinary user")
        + "."
    )
    versions = ", ".join(f"{k} {v}" for k, v in sorted(m.get("packages", {}).items()) if v)
    if versions:
        out.append(f"Packages: {versions}.")

    per = data["per_test"]
    sizes = sorted({r["files"] for r in per})
    tools: list[str] = []
    for r in per:
        if r["tool"] not in tools:
            tools.append(r["tool"])
    out.append("### Per-test overhead\n")
    out.append(
        "Median of setup + teardown per test, in milliseconds, with the 10th-90th percentile "
        "range, by number of files in the base tree."
    )
    rows = []
    for tool in tools:
        cells = [tool]
        for n in sizes:
            hit = [r for r in per if r["tool"] == tool and r["files"] == n]
            if hit:
                r = hit[0]
                cells.append(
                    f"{_ms(r['median_ms'])} ({_ms(r['p10_ms'])}-{_ms(r['p90_ms'])},"
                    f" n={r['samples']})"
                )
            else:
                cells.append("not run")
        rows.append(cells)
    out.append(_table(["tool"] + [f"{n:,} files" for n in sizes], rows))
    if data.get("unavailable"):
        out.append(
            "Not measured on this machine: "
            + "; ".join(f"{u['tool']} ({u['reason']})" for u in data["unavailable"])
            + "."
        )

    if data.get("session_start"):
        out.append("### Session start\n")
        rows = [
            [
                s["what"],
                f"{s['layers']}",
                f"{s['files']:,}",
                _ms(s["first_setup_ms"]),
                _ms(s["wall_ms"]),
            ]
            for s in data["session_start"]
        ]
        out.append(
            "First test's setup (which resolves the whole layer chain) and the wall time of the "
            "whole `pytest` process, in milliseconds."
        )
        out.append(_table(["session", "layers", "files", "first setup (ms)", "wall (ms)"], rows))

    if data.get("diff"):
        out.append("### `diff()` and `commit()` cost\n")
        rows = [
            [
                d["backend"],
                f"{d['base_files']:,}",
                f"{d['changes']:,}",
                _ms(d["diff_median_ms"]),
                _ms(d.get("commit_median_ms")),
            ]
            for d in data["diff"]
        ]
        out.append("Median in milliseconds, by number of files the test changed.")
        out.append(
            _table(["backend", "base files", "changes", "diff() (ms)", "commit() (ms)"], rows)
        )

    if data.get("xdist"):
        out.append("### pytest-xdist\n")
        rows = [
            [
                x["tool"],
                f"{x['tests']}",
                f"{x['files']:,}",
                str(x["workers"]) if x["workers"] else "off",
                _ms(x["wall_ms"]),
                "" if x.get("builds") is None else str(x["builds"]),
            ]
            for x in data["xdist"]
        ]
        out.append(
            "Wall time of the whole run in milliseconds; `builds` counts how often the layer "
            "builder ran, starting from an empty store."
        )
        out.append(_table(["tool", "tests", "base files", "workers", "wall (ms)", "builds"], rows))

    if data.get("targets"):
        out.append("### Against the design targets\n")
        rows = [
            [t["target"], t["measured"], {True: "met", False: "missed", None: "n/a"}[t["met"]]]
            for t in data["targets"]
        ]
        out.append(_table(["target", "measured", ""], rows))
    return "\n\n".join(out) + "\n"
