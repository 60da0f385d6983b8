"""configtool: a tiny etcctl-like tool for `key = value` config files under an /etc tree.

Settings live in ``<root>/etc/configtool.d/*.conf``, read in name order, later files winning.
``set`` writes to ``99-local.conf``; ``unset`` removes a key from every file.

    python configtool.py --root / get app.debug
    python configtool.py --root / set app.debug true
    python configtool.py --root / list
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

LOCAL = "99-local.conf"


def conf_dir(root: Path) -> Path:
    return root / "etc" / "configtool.d"


def parse(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"line {n}: expected 'key = value', got {line!r}")
        out[key.strip()] = value.strip()
    return out


def load(root: Path) -> dict[str, str]:
    """The effective settings: every file in name order, later ones winning."""
    merged: dict[str, str] = {}
    directory = conf_dir(root)
    if directory.is_dir():
        for path in sorted(directory.glob("*.conf")):
            try:
                merged.update(parse(path.read_text()))
            except ValueError as exc:
                raise SystemExit(f"configtool: {path}: {exc}") from None
    return merged


def set_value(root: Path, key: str, value: str) -> None:
    directory = conf_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    local = directory / LOCAL
    values = parse(local.read_text()) if local.exists() else {}
    values[key] = value
    local.write_text("".join(f"{k} = {v}\n" for k, v in sorted(values.items())))


def unset(root: Path, key: str) -> bool:
    found = False
    for path in sorted(conf_dir(root).glob("*.conf")):
        values = parse(path.read_text())
        if key in values:
            found = True
            del values[key]
            if values:
                path.write_text("".join(f"{k} = {v}\n" for k, v in sorted(values.items())))
            else:
                path.unlink()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="configtool")
    parser.add_argument("--root", type=Path, default=Path("/"))
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("get").add_argument("key")
    p = sub.add_parser("set")
    p.add_argument("key")
    p.add_argument("value")
    sub.add_parser("unset").add_argument("key")
    sub.add_parser("list")
    args = parser.parse_args(argv)
    if args.verb == "get":
        values = load(args.root)
        if args.key not in values:
            print(f"configtool: {args.key}: not set", file=sys.stderr)
            return 1
        print(values[args.key])
    elif args.verb == "set":
        set_value(args.root, args.key, args.value)
    elif args.verb == "unset":
        if not unset(args.root, args.key):
            print(f"configtool: {args.key}: not set", file=sys.stderr)
            return 1
    else:
        for key, value in sorted(load(args.root).items()):
            print(f"{key} = {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
