"""Writing files and directories all at once: everything goes under a temporary name in the destination's own
folder (so the final rename never crosses a file system), is flushed to disk, and is then renamed into place.

    write_file(path, data)           one file: a temporary sibling, fsync, os.replace
    staged_file(path)                the same, for writers that want a path (safetensors, GGUF, torch.save)
    staged_directory(directory)      a whole directory, replacing any old one: the new one appears whole or not at all
    staged_files(directory)          a few files that land in a directory holding others (an adapter in output_dir):
                                     all of them, or none (on any error, the files that were there are put back)

A reader never sees a half-written file. An error or Ctrl-C while writing leaves the destination as it was and
removes the temporaries. A crash of the machine between the renames of `staged_files` (each file is one rename) can
leave some files new and some old; a directory that did not exist yet is renamed into place in one step.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TEMP_PREFIX = ".tmp-"  # temporaries are hidden siblings: .tmp-NAME.RANDOM


def temporary_name(path: Path) -> str:
    """The prefix of `path`'s temporaries (what a clean-up of abandoned writes looks for)."""
    return f"{TEMP_PREFIX}{path.name}."


def fresh_path(path: Path, directory: bool = False) -> Path:
    """Create an empty temporary file (or folder) next to `path`, with the permissions a plain create would give
    (tempfile's are private to the user, and the rename would carry that over)."""
    while True:
        tmp = path.parent / f"{temporary_name(path)}{uuid.uuid4().hex[:12]}"
        try:
            if directory:
                tmp.mkdir()
            else:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk (a no-op where the OS refuses, e.g. directories on
    Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then each folder, deepest first."""
    for root, _, files in os.walk(directory, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` to write into; on success it is fsynced and replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_path(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_file(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` all at once; returns `path`."""
    path = Path(path)
    with staged_file(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return path


@contextlib.contextmanager
def staged_directory(directory: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `directory`; on success it replaces `directory` (and whatever was in
    it): the old one is renamed aside, the new one renamed in, the old one deleted. If the second rename fails the
    old one is renamed back."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_path(directory, directory=True)
    try:
        yield tmp
        fsync_tree(tmp)
        _swap_in(tmp, directory)
        fsync_path(directory.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, directory: Path) -> None:
    if not directory.exists():
        new.rename(directory)
        return
    old = directory.parent / f"{temporary_name(directory)}old-{uuid.uuid4().hex[:12]}"
    directory.rename(old)
    try:
        new.rename(directory)
    except BaseException:
        old.rename(directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_files(directory: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `directory` to write files into; on success they all land in `directory`.

    A `directory` that does not exist yet is the temporary one renamed (one step). Into an existing directory the
    files move one by one, each old file first set aside; if any move fails, the new files are removed and the old
    ones put back, so the directory holds all the new files or none of them.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_path(directory, directory=True)
    try:
        yield tmp
        fsync_tree(tmp)
        if not directory.exists():
            tmp.rename(directory)
        else:
            _move_all_or_none(tmp, directory)
        fsync_path(directory)
        fsync_path(directory.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_all_or_none(staged: Path, directory: Path) -> None:
    """Move every file of `staged` into `directory`, replacing files of the same names, or (on error) none."""
    names = sorted(p.name for p in staged.iterdir())
    if any((staged / name).is_dir() for name in names):
        raise IsADirectoryError(f"{staged}: staged_files moves files, not folders")
    backup = staged / (TEMP_PREFIX + "previous")
    backup.mkdir()
    set_aside, placed = [], []
    try:
        for name in names:
            target = directory / name
            if target.exists():
                os.replace(target, backup / name)
                set_aside.append(name)
            os.replace(staged / name, target)
            placed.append(name)
    except BaseException:
        for name in reversed(placed):
            (directory / name).unlink(missing_ok=True)
        for name in set_aside:
            os.replace(backup / name, directory / name)
        raise
