"""Data sets on disk: names in a LLaMA-Factory `dataset_info.json` registry or file paths, read into records.

`dataset: "identity,data/extra.jsonl"` names one or more data sets, comma-separated. A name is looked up in
`<dataset_dir>/dataset_info.json` (its `file_name` is a file or a folder of files, relative to `dataset_dir`),
or else taken as a path (as given, or under `dataset_dir`). Files are JSON (a list of objects; a `.json` file that
holds one object per line is read as JSONL), JSONL, CSV or parquet (needs pyarrow).

Everything here runs without a tokenizer or a model, so the trainer can check the data before loading either.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import random
from collections.abc import Iterator

from .formats import DataError, RecordFormat, detect_format, normalize, registered_format

REGISTRY_NAME = "dataset_info.json"
FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet")
STAGES = ("sft", "pt")


def load_records(dataset: str | list[str], dataset_dir: str = "data", stage: str = "sft",
                 max_samples: int | None = None) -> list[dict]:
    """All records of the named data sets, concatenated in the order given, each normalised (see `formats`).

    `max_samples` keeps the first N records of each data set.
    """
    return [r for records in load_datasets(dataset, dataset_dir, stage, max_samples).values() for r in records]


def check_datasets(dataset: str | list[str], dataset_dir: str = "data", stage: str = "sft",
                   max_samples: int | None = None) -> dict[str, int]:
    """Read and validate every named data set (no tokenizer needed); returns the record count of each.

    Raises `DataError` (one line: file, record, problem) on the first bad input.
    """
    return {name: len(records) for name, records in load_datasets(dataset, dataset_dir, stage, max_samples).items()}


def load_datasets(dataset: str | list[str], dataset_dir: str = "data", stage: str = "sft",
                  max_samples: int | None = None) -> dict[str, list[dict]]:
    """The normalised records of each named data set, by name."""
    if stage not in STAGES:
        raise DataError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    names = [n.strip() for n in (dataset.split(",") if isinstance(dataset, str) else dataset) if n.strip()]
    if not names:
        raise DataError("no dataset given (dataset: name1,name2 or a file path)")
    if len(set(names)) < len(names):
        raise DataError(f"a dataset is listed twice in {','.join(names)!r}")
    registry = read_registry(dataset_dir)
    out = {}
    for name in names:
        files, fmt, num_samples = resolve(name, dataset_dir, registry, stage)
        records = _read_dataset(files, fmt, stage, None if num_samples else max_samples)
        if num_samples:
            records = _sample(records, num_samples)[:max_samples]
        if not records:
            raise DataError(f"dataset {name!r} is empty ({', '.join(files)})")
        out[name] = records
    return out


def read_registry(dataset_dir: str) -> dict[str, dict]:
    """`<dataset_dir>/dataset_info.json` as a dict ({} when the file does not exist)."""
    path = os.path.join(dataset_dir, REGISTRY_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            registry = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(registry, dict) or not all(isinstance(v, dict) for v in registry.values()):
        raise DataError(f"{path}: must map data set names to objects with a file_name")
    return registry


def resolve(name: str, dataset_dir: str, registry: dict, stage: str) -> tuple[list[str], RecordFormat | None, int]:
    """(files, declared format or None to detect it, num_samples or 0) of one data set name."""
    if name in registry:
        entry, where = registry[name], f"{os.path.join(dataset_dir, REGISTRY_NAME)} [{name!r}]"
        if entry.get("ranking"):
            raise DataError(f"{where}: a preference (ranking) data set; lorakit trains sft and pt only")
        if "file_name" not in entry:
            hub = next((k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url") if k in entry), None)
            why = f"it points to a hub ({hub}); download it and set file_name" if hub else "it has no file_name"
            raise DataError(f"{where}: lorakit reads local files only, and {why}")
        path = os.path.join(dataset_dir, entry["file_name"])
        if not os.path.exists(path):
            raise DataError(f"{where}: data file {path} not found")
        return _files(path), registered_format(entry, stage, where), int(entry.get("num_samples") or 0)
    for path in (name, os.path.join(dataset_dir, name)):
        if os.path.exists(path):
            return _files(path), None, 0
    raise DataError(_unknown(name, dataset_dir, registry))


def _unknown(name: str, dataset_dir: str, registry: dict) -> str:
    if not registry:
        return f"unknown dataset {name!r}: no such file, and no {REGISTRY_NAME} in {dataset_dir!r}"
    close = difflib.get_close_matches(name, list(registry), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    known = ", ".join(list(registry)[:30]) + (", ..." if len(registry) > 30 else "")
    return f"unknown dataset {name!r}{hint} (registered in {dataset_dir}/{REGISTRY_NAME}: {known})"


def _files(path: str) -> list[str]:
    if os.path.isfile(path):
        if not path.endswith(FILE_TYPES):
            raise DataError(f"{path}: unsupported file type (use {', '.join(FILE_TYPES)})")
        return [path]
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(FILE_TYPES) and f[0] != ".")
    if not files:
        raise DataError(f"{path}: folder has no data files ({', '.join(FILE_TYPES)})")
    return files


def _read_dataset(files: list[str], fmt: RecordFormat | None, stage: str, limit: int | None) -> list[dict]:
    """Normalised records of a data set's files, at most `limit`; an undeclared format is detected per file."""
    records: list[dict] = []
    for path in files:
        file_fmt = fmt
        for where, raw in read_file(path):
            if limit is not None and len(records) >= limit:
                return records
            file_fmt = file_fmt or detect_format(raw, stage, where)
            records.append(normalize(raw, file_fmt, where))
    return records


def read_file(path: str) -> Iterator[tuple[str, object]]:
    """(where, raw record) for each record of one file; `where` is `path:line` or `path[index]`."""
    if path.endswith(".parquet"):
        yield from _read_parquet(path)
        return
    with open(path, encoding="utf-8") as f:
        if path.endswith(".csv"):
            reader = csv.DictReader(f)
            for row in reader:
                yield f"{path}:{reader.line_num}", row
            return
        if path.endswith(".jsonl") or not _starts_with_bracket(f):
            yield from _read_jsonl(f, path)
            return
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield f"{path}[{i}]", record


def _read_jsonl(f, path: str) -> Iterator[tuple[str, object]]:
    for line_no, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{line_no}", json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: malformed JSON line ({e.msg}, column {e.colno})") from None


def _read_parquet(path: str) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: unreadable parquet file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    for i, row in enumerate(rows):
        yield f"{path}[{i}]", row


def _starts_with_bracket(f) -> bool:
    """Whether a text file's first non-blank character is `[` (a JSON list); rewinds the file."""
    head = f.read(4096)
    while head and not head.strip():
        head = f.read(4096)
    f.seek(0)
    return head.lstrip().startswith("[")


def _sample(records: list[dict], n: int, seed: int = 0) -> list[dict]:
    """`num_samples` of a registry entry: a seeded random subset, or repeats plus random extras when n > len."""
    rng = random.Random(seed)
    whole, rest = divmod(n, len(records)) if records else (0, 0)
    order = list(range(len(records))) * whole + rng.sample(range(len(records)), rest)
    return [records[i] for i in order]
