"""Writing an export directory all at once: files go into a hidden temporary sibling, which is renamed into place
only when everything was written, so an interrupted or failed export leaves nothing half-written behind."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_destination(directory: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty destination (or a file in its place) unless `overwrite`; nothing is touched here."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"export directory '{directory}' is a file; choose another export_dir")
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"export directory '{directory}' is not empty; pass overwrite_output_dir=true "
                              f"(--overwrite) or choose another export_dir")
    return directory


@contextlib.contextmanager
def staged_directory(directory: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `directory` to write into; on success it replaces `directory`."""
    directory = check_destination(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
