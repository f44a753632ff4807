"""Temporary siblings for all-or-nothing writes, with the permissions a plain write would give.

``tempfile`` creates files 0600 and folders 0700 so that nobody else can read them while they
are being filled; renamed into place they would keep those modes, and a mask file or merged model
in a shared folder could not be read by anyone else. Every staged output of the package is made
here and gets the mode the user's umask gives a new file or folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dam_mergekit.errors import DamError


def current_umask() -> int:
    """The process umask, read without changing it where the system tells (Linux).

    Setting and restoring it would open a moment in which other threads (mergekit writes in
    several) create files without any mask.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_mode(*, is_dir: bool) -> int:
    """The mode ``open``/``mkdir`` would give a new file or folder under the current umask."""
    return (0o777 if is_dir else 0o666) & ~current_umask()


def temp_sibling(out: Path, *, is_dir: bool = False, tag: str = "") -> Path:
    """A new hidden file or folder beside ``out`` (same file system, so ``os.replace`` works)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.{tag}"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=out.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
    os.chmod(tmp, plain_mode(is_dir=is_dir))
    return tmp


def give_plain_modes(tree: Path) -> None:
    """Plain modes for a staged file or folder and everything in it, just before it is published.

    Writers such as safetensors recreate their file 0600 whatever the folder's mode.
    """
    tree = Path(tree)
    os.chmod(tree, plain_mode(is_dir=tree.is_dir()))
    if tree.is_dir():
        for entry in tree.rglob("*"):
            if not entry.is_symlink():
                os.chmod(entry, plain_mode(is_dir=entry.is_dir()))


def publish(tmp: Path, out: Path) -> None:
    """Move the staged ``tmp`` onto ``out`` with plain modes; an old folder there is swapped out
    first and removed after, so ``out`` is always either the old or the new one."""
    tmp, out = Path(tmp), Path(out)
    give_plain_modes(tmp)
    if tmp.is_file() and out.is_dir():
        raise DamError(f"{out}: is a folder; name a file to write")
    if not out.is_dir() or out.is_symlink():
        os.replace(tmp, out)
        return
    old = temp_sibling(out, is_dir=True, tag="old-")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def publish_into(tmp: Path, out: Path) -> None:
    """Move the staged folder's entries into the folder ``out`` (created if missing), replacing
    their namesakes and keeping every other file there, as a plain write into ``out`` would."""
    tmp, out = Path(tmp), Path(out)
    give_plain_modes(tmp)
    if not out.exists():
        os.replace(tmp, out)
        return
    for entry in sorted(tmp.iterdir()):
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()


@contextlib.contextmanager
def staged_files(*paths: Path, is_dir: bool = False) -> Iterator[list[Path]]:
    """Temporary siblings of ``paths`` to fill; all renamed into place only if the block
    succeeds (otherwise none is, and the siblings are removed), so outputs that belong together
    are published together."""
    temps: list[Path] = []
    try:
        temps.extend(temp_sibling(Path(p), is_dir=is_dir) for p in paths)
        yield temps
        for tmp, path in zip(temps, paths, strict=True):
            publish(tmp, Path(path))
    except BaseException:
        for tmp in temps:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_file(path: Path, *, is_dir: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``path`` (a folder with ``is_dir``) to fill; renamed onto ``path``
    only if the block succeeds, removed if it fails."""
    with staged_files(path, is_dir=is_dir) as (tmp,):
        yield tmp


def staged_dir(path: Path) -> contextlib.AbstractContextManager[Path]:
    """:func:`staged_file` for a folder: an interrupted writer leaves no half folder at ``path``."""
    return staged_file(path, is_dir=True)
