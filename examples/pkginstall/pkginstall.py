"""pkginstall: a tiny package installer in the style of dpkg and pacman, for a root directory.

A package is a tar archive: a ``.PKGINFO`` file plus the files to install, with paths relative
to the root. ``.PKGINFO`` holds ``key = value`` lines::

    name = hello
    version = 2.12
    depends = libc
    backup = etc/hello.conf      # a config file: local edits survive upgrades and removal
    dirs = usr/share/hello        # directories it owns even when empty

The database lives in ``<root>/var/lib/pkgdb/<name>/`` (``info``: the package's .PKGINFO,
``files``: what it installed, with a sha256 per file), one directory per package, so two
trees built apart can be stacked and their databases merge.

    python pkginstall.py build SRCDIR -o hello-2.12.tar
    python pkginstall.py --root R install hello-2.12.tar      # also upgrades
    python pkginstall.py --root R remove hello
    python pkginstall.py --root R list | files NAME | owner PATH | verify [NAME...]

``<root>/etc/pkginstall.conf`` may hold ``path-exclude = GLOB`` lines (like dpkg's
``path-exclude``): matching paths are neither installed nor recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fnmatch
import hashlib
import os
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

DB = PurePosixPath("var/lib/pkgdb")
CONF = PurePosixPath("etc/pkginstall.conf")
INFO = ".PKGINFO"


class PkgError(Exception):
    """A refusal with a message for the user; nothing has been written when it is raised."""


@dataclass
class PkgInfo:
    name: str
    version: str
    depends: list[str] = field(default_factory=list)
    backup: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    description: str = ""

    @classmethod
    def parse(cls, text: str, origin: str) -> PkgInfo:
        values: dict[str, list[str]] = {}
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise PkgError(f"{origin}: line {n}: expected 'key = value', got {raw!r}")
            values.setdefault(key.strip(), []).append(value.strip())
        for key in ("name", "version"):
            if len(values.get(key, [])) != 1:
                raise PkgError(f"{origin}: needs exactly one '{key} = ...' line")
        return cls(
            name=values["name"][0],
            version=values["version"][0],
            depends=[d for v in values.get("depends", []) for d in v.replace(",", " ").split()],
            backup=[_clean(b, origin) for b in values.get("backup", [])],
            dirs=[_clean(d, origin) for v in values.get("dirs", []) for d in v.split()],
            description=" ".join(values.get("description", [])),
        )

    def render(self) -> str:
        lines = [f"name = {self.name}", f"version = {self.version}"]
        if self.description:
            lines.append(f"description = {self.description}")
        lines += [f"depends = {d}" for d in self.depends]
        lines += [f"backup = {b}" for b in self.backup]
        if self.dirs:
            lines.append(f"dirs = {' '.join(self.dirs)}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Entry:
    """One installed path: kind ``d`` (directory), ``f`` (file, with its sha256) or ``l``."""

    kind: str
    path: str
    sha256: str = "-"

    def render(self) -> str:
        return f"{self.kind} {self.sha256} {self.path}"

    @classmethod
    def parse(cls, line: str) -> Entry:
        kind, digest, path = line.split(" ", 2)
        return cls(kind, path, digest)


@dataclass
class Installed:
    info: PkgInfo
    entries: list[Entry]

    def by_path(self) -> dict[str, Entry]:
        return {e.path: e for e in self.entries}


def _clean(name: str, origin: str) -> str:
    """A member name as a relative path that stays inside the root, or a PkgError."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise PkgError(f"{origin}: refusing path {name!r}: it leaves the root")
    return str(path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str | None:
    try:
        return _sha256(path.read_bytes())
    except FileNotFoundError:
        return None


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.pkgtmp")
    try:
        tmp.write_bytes(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        # Name the file being installed, not the temporary one.
        raise OSError(exc.errno, exc.strerror, str(path)) from None


# ---- the database ------------------------------------------------------------------------


def load_db(root: Path) -> dict[str, Installed]:
    """Every installed package, by name."""
    db: dict[str, Installed] = {}
    directory = root / DB
    if not directory.is_dir():
        return db
    for pkgdir in sorted(directory.iterdir()):
        info = PkgInfo.parse((pkgdir / "info").read_text(), str(pkgdir / "info"))
        lines = (pkgdir / "files").read_text().splitlines()
        db[info.name] = Installed(info, [Entry.parse(line) for line in lines if line])
    return db


def _save_db(root: Path, pkg: Installed) -> None:
    pkgdir = root / DB / pkg.info.name
    pkgdir.mkdir(parents=True, exist_ok=True)
    _write_atomic(pkgdir / "info", pkg.info.render().encode())
    _write_atomic(pkgdir / "files", "".join(e.render() + "\n" for e in pkg.entries).encode())


def path_excludes(root: Path) -> list[str]:
    conf = root / CONF
    if not conf.exists():
        return []
    out = []
    for raw in conf.read_text().splitlines():
        key, sep, value = raw.split("#", 1)[0].partition("=")
        if sep and key.strip() == "path-exclude":
            out.append(value.strip())
    return out


# ---- building a package ------------------------------------------------------------------


def build(srcdir: Path, out: Path) -> PkgInfo:
    """Pack ``srcdir`` (a .PKGINFO and the tree to install) into a reproducible tar."""
    info = PkgInfo.parse((srcdir / INFO).read_text(), str(srcdir / INFO))

    def normalize(member: tarfile.TarInfo) -> tarfile.TarInfo:
        # Same tree, same bytes: packages built on two machines must be identical.
        member.uid = member.gid = 0
        member.uname = member.gname = "root"
        member.mtime = 0
        return member

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(srcdir / INFO, INFO, filter=normalize)
        # Declared directories first (sorted, so parents come before children): they may be
        # empty, and version control keeps no empty directories.
        declared = sorted(set(info.dirs))
        for d in declared:
            member = normalize(tarfile.TarInfo(d))
            member.type, member.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(member)
        for dirpath, dirnames, filenames in os.walk(srcdir):
            dirnames.sort()
            rel = Path(dirpath).relative_to(srcdir)
            if rel != Path(".") and str(rel) not in declared:
                tar.add(dirpath, str(rel), recursive=False, filter=normalize)
            for name in sorted(filenames):
                if rel == Path(".") and name == INFO:
                    continue
                tar.add(Path(dirpath, name), str(rel / name), filter=normalize)
    return info


# ---- installing --------------------------------------------------------------------------


@dataclass
class _Member:
    kind: str
    path: str
    mode: int
    data: bytes = b""
    target: str = ""


def _read_package(archive: Path) -> tuple[PkgInfo, list[_Member]]:
    try:
        with tarfile.open(archive) as tar:
            info, members = _read_members(tar, archive.name)
    except (OSError, tarfile.TarError) as exc:
        raise PkgError(f"{archive}: not a package: {exc}") from None
    if info is None:
        raise PkgError(f"{archive.name}: no {INFO} in the archive; build packages with 'build'")
    return info, members


def _read_members(tar: tarfile.TarFile, origin: str) -> tuple[PkgInfo | None, list[_Member]]:
    info: PkgInfo | None = None
    members: list[_Member] = []
    for m in tar:
        f = tar.extractfile(m) if m.isfile() else None
        if m.name == INFO and f is not None:
            info = PkgInfo.parse(f.read().decode(), f"{origin}:{INFO}")
            continue
        path = _clean(m.name, origin)
        if m.isdir():
            members.append(_Member("d", path, m.mode & 0o7777))
        elif f is not None:
            members.append(_Member("f", path, m.mode & 0o7777, f.read()))
        elif m.issym():
            members.append(_Member("l", path, 0o777, target=m.linkname))
        else:
            raise PkgError(f"{origin}: {m.name}: unsupported member type (hard link or device)")
    return info, members


def install(root: Path, archive: Path) -> list[str]:
    """Install or upgrade the package in ``archive``; returns notes for the user.

    Every check runs before the first write, so a refused install leaves the root untouched.
    """
    info, members = _read_package(archive)
    db = load_db(root)
    old = db.get(info.name)
    if old is not None and old.info.version == info.version:
        return [f"{info.name} {info.version} is already installed"]
    missing = [d for d in info.depends if d not in db]
    if missing:
        raise PkgError(
            f"{info.name} {info.version}: missing dependencies: {', '.join(missing)} "
            "(install them first)"
        )
    excludes = path_excludes(root)
    members = [m for m in members if not any(fnmatch.fnmatch(m.path, g) for g in excludes)]
    owners = {e.path: name for name, pkg in db.items() if name != info.name for e in pkg.entries}
    mine = old.by_path() if old else {}
    shipped_dirs = {m.path for m in members if m.kind == "d"}
    for m in members:
        target = root / m.path
        parent = str(PurePosixPath(m.path).parent)
        if parent != "." and parent not in shipped_dirs and not (root / parent).is_dir():
            raise PkgError(f"{info.name}: {m.path}: its directory /{parent} does not exist")
        if m.kind == "d":
            if os.path.lexists(target) and not target.is_dir():
                raise PkgError(f"{info.name}: {m.path} is a directory in the package, not here")
            continue
        if m.path in owners:
            raise PkgError(
                f"{info.name}: {m.path} is already owned by {owners[m.path]} "
                f"(remove {owners[m.path]} first)"
            )
        if os.path.lexists(target) and m.path not in mine:
            raise PkgError(f"{info.name}: {m.path} exists in the filesystem and no package owns it")

    notes: list[str] = []
    entries: list[Entry] = []
    for m in members:
        target = root / m.path
        if m.kind == "d":
            target.mkdir(mode=m.mode, exist_ok=True)
            entries.append(Entry("d", m.path))
        elif m.kind == "l":
            if os.path.lexists(target):
                target.unlink()
            target.symlink_to(m.target)
            entries.append(Entry("l", m.path))
        else:
            digest = _sha256(m.data)
            entries.append(Entry("f", m.path, digest))
            if m.path in info.backup and m.path in mine:
                on_disk = _file_sha256(target)
                if on_disk is not None and on_disk not in (mine[m.path].sha256, digest):
                    # pacman's rule: never overwrite a local edit; when the default changed,
                    # put the new one beside it for the admin to merge.
                    if digest != mine[m.path].sha256:
                        _write_atomic(target.with_name(target.name + ".pkgnew"), m.data, m.mode)
                        notes.append(f"{m.path} was edited locally: new default as .pkgnew")
                    continue
            _write_atomic(target, m.data, m.mode)
    if old is not None:
        kept = {e.path for e in entries}
        gone = [e for e in old.entries if e.path not in kept]
        notes += _remove_entries(root, gone, db, info.name, old.info.backup)
        notes.append(f"upgraded {info.name} {old.info.version} -> {info.version}")
    _save_db(root, Installed(info, entries))
    return notes


# ---- removing ----------------------------------------------------------------------------


def _remove_entries(
    root: Path, entries: list[Entry], db: dict[str, Installed], name: str, backup: list[str]
) -> list[str]:
    notes = []
    shared_dirs = {
        e.path for other, pkg in db.items() if other != name for e in pkg.entries if e.kind == "d"
    }
    for e in entries:
        if e.kind == "d":
            continue
        target = root / e.path
        if e.path in backup and _file_sha256(target) not in (None, e.sha256):
            os.replace(target, target.with_name(target.name + ".pkgsave"))
            notes.append(f"{e.path} was edited locally: saved as .pkgsave")
            continue
        target.unlink(missing_ok=True)
    # Deepest first, so a directory is empty by the time its turn comes; a directory another
    # package ships, or one holding files nobody owns, stays.
    for e in sorted((e for e in entries if e.kind == "d"), key=lambda e: e.path, reverse=True):
        if e.path in shared_dirs:
            continue
        try:
            (root / e.path).rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
    return notes


def remove(root: Path, name: str) -> list[str]:
    """Remove an installed package; edited config files are kept as ``*.pkgsave``."""
    db = load_db(root)
    if name not in db:
        raise PkgError(f"{name}: not installed")
    needed_by = sorted(other for other, pkg in db.items() if name in pkg.info.depends)
    if needed_by:
        raise PkgError(f"{name}: required by {', '.join(needed_by)} (remove those first)")
    pkg = db[name]
    notes = _remove_entries(root, pkg.entries, db, name, pkg.info.backup)
    pkgdir = root / DB / name
    for child in ("info", "files"):
        (pkgdir / child).unlink()
    pkgdir.rmdir()
    return notes


# ---- queries -----------------------------------------------------------------------------


def verify(root: Path, names: list[str]) -> list[str]:
    """One line per installed file that is missing or differs from what was installed."""
    db = load_db(root)
    problems = []
    for name in names or sorted(db):
        if name not in db:
            raise PkgError(f"{name}: not installed")
        for e in db[name].entries:
            target = root / e.path
            if e.kind == "f":
                digest = _file_sha256(target)
                if digest is None:
                    problems.append(f"{name}: {e.path}: missing")
                elif digest != e.sha256 and e.path not in db[name].info.backup:
                    problems.append(f"{name}: {e.path}: modified")
            elif not os.path.lexists(target):
                problems.append(f"{name}: {e.path}: missing")
    return problems


def _run(args: argparse.Namespace, out: list[str]) -> int:
    root: Path = args.root
    if args.verb == "build":
        info = build(args.srcdir, args.out)
        out.append(f"built {info.name} {info.version}: {args.out}")
    elif args.verb == "install":
        out += [f"pkginstall: {note}" for note in install(root, args.archive)]
    elif args.verb == "remove":
        out += [f"pkginstall: {note}" for note in remove(root, args.name)]
    elif args.verb == "list":
        out += [f"{name} {pkg.info.version}" for name, pkg in load_db(root).items()]
    elif args.verb == "files":
        db = load_db(root)
        if args.name not in db:
            raise PkgError(f"{args.name}: not installed")
        out += [f"/{e.path}{'/' if e.kind == 'd' else ''}" for e in db[args.name].entries]
    elif args.verb == "owner":
        path = args.path.strip("/")
        owners = [name for name, pkg in load_db(root).items() if path in pkg.by_path()]
        if not owners:
            raise PkgError(f"/{path}: no package owns it")
        out.append(" ".join(owners))
    else:
        problems = verify(root, args.names)
        out += problems
        return 1 if problems else 0
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pkginstall")
    parser.add_argument("--root", type=Path, default=Path("/"))
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("build")
    p.add_argument("srcdir", type=Path)
    p.add_argument("-o", dest="out", type=Path, required=True)
    sub.add_parser("install").add_argument("archive", type=Path)
    sub.add_parser("remove").add_argument("name")
    sub.add_parser("list")
    sub.add_parser("files").add_argument("name")
    sub.add_parser("owner").add_argument("path")
    sub.add_parser("verify").add_argument("names", nargs="*")
    args = parser.parse_args(argv)
    out: list[str] = []
    try:
        code = _run(args, out)
    except PkgError as exc:
        code, error = 1, str(exc)
    except OSError as exc:
        # A read-only or full root: name the path as seen inside the root, not a traceback.
        where = ""
        if exc.filename:
            rel = os.path.relpath(exc.filename, args.root)
            where = f" /{rel}" if not rel.startswith("..") else f" {exc.filename}"
        code, error = 1, f"{args.verb} failed at{where}: {exc.strerror}"
    else:
        error = ""
    sys.stdout.write("".join(line + "\n" for line in out))
    if error:
        print(f"pkginstall: {error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
