"""Writing an export directory all at once: files go into a hidden temporary sibling, which is renamed into place
only when everything was written (`lorakit.files.staged_directory`), so an interrupted or failed export leaves
nothing half-written behind."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from .. import files


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
    with files.staged_directory(check_destination(directory, overwrite)) as tmp:
        yield tmp
