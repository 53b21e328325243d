"""Where records come from: a JSONL file (our own reader, errors by line), or anything the
Hugging Face `datasets` library reads (errors by row and column).

A source is what `data.train_path` (or `validation_path`, `test_path`) says:

- ``*.jsonl`` (any file but the three below): read line by line (`formats.read_jsonl`), so a broken line is named file:line;
- ``*.parquet``, ``*.json``, ``*.csv``: one file, through `datasets.load_dataset`;
- a folder written by ``save_to_disk`` (``dataset_dict.json`` or ``state.json`` in it);
- any other folder: a Hub-layout dataset repository (``data/train-00000-of-00001.parquet``, ...);
- ``owner/name`` that is no local path: a Hub dataset id, downloaded and cached by `datasets`.

A source with several splits gives the one asked for (or the first default present); a source with
one split gives that one. Rows are returned as plain dicts, numbered from 0 as `dataset[i]` and
pandas number them. Reading is cached per process (trials of a study, and the config check before
them, read each source once).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from lit_sft.errors import UserError

TABLE_FILES = {".parquet": "parquet", ".json": "json", ".csv": "csv"}
"""File suffix -> the `datasets` builder that reads it (.jsonl has a reader of its own)."""
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_CACHE: dict[tuple, Rows] = {}
_CACHE_SIZE = 6
T = TypeVar("T")


@dataclass(frozen=True)
class Source:
    """One configured source: the path or id and split as given, and the keys that set them."""

    spec: str
    """A path or a Hub dataset id (data.train_path, ...)."""
    split: str | None
    """The split asked for; None = the first of `defaults` present, or the only split."""
    defaults: tuple[str, ...]
    """Splits tried in order when `split` is None."""
    key: str
    """Config key of `spec`, for messages: data.train_path."""
    split_key: str
    """Config key of `split`: data.train_split."""


@dataclass(frozen=True)
class Rows:
    """The records of one split of a source."""

    label: str
    """How messages name the source: the path or id, with the split when there is a choice."""
    identity: tuple[str, str]
    """(resolved path or id, split): equal for two configured sources that are the same data."""
    records: list[tuple[str, dict[str, Any]]]
    """(where, record): where is "file:line" (JSONL) or "label, row i" (tables)."""
    columns: tuple[str, ...] | None
    """The table's column names; None for JSONL (records may differ in their fields)."""


def kind(spec: str) -> str | None:
    """jsonl, table, disk (save_to_disk), folder (Hub layout), hub (a Hub id), or None: no such path."""
    path = Path(spec)
    if path.is_dir():
        return "disk" if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file() else "folder"
    if path.is_file():
        return "jsonl" if path.suffix.lower() != ".json" and path.suffix.lower() not in TABLE_FILES else "table"
    if _HUB_ID.fullmatch(spec) and path.suffix.lower() not in (*TABLE_FILES, ".jsonl"):
        return "hub"
    return None


def spec_problem(spec: str, key: str) -> str | None:
    """What is wrong with a configured path before anything is read (no network), or None."""
    if kind(spec) is None:
        return f"{key}: no such file or folder: {spec} (a .jsonl, .parquet, .json or .csv file, a dataset folder, or a Hub id owner/name)"
    return None


def read(source: Source) -> Rows:
    """The records of `source`'s chosen split; UserError naming the key, path and split if it cannot."""
    what = kind(source.spec)
    if what is None:
        raise UserError(spec_problem(source.spec, source.key))
    cache_key = (source.spec, source.split, source.defaults, stamp(source.spec))
    if cache_key not in _CACHE:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[cache_key] = _read_jsonl(source) if what == "jsonl" else _read_table(source, what)
    return _CACHE[cache_key]


def same_data(a: Source, b: Source) -> bool:
    """Whether two configured sources are the same records (same file or dataset, same split)."""
    if _resolved(a.spec) != _resolved(b.spec):
        return False  # without reading either: a source only one role needs is never read for this
    return read(a).identity == read(b).identity


def _resolved(spec: str) -> str:
    return spec if kind(spec) == "hub" else str(Path(spec).resolve())


def stamp(spec: str) -> tuple[int, ...] | None:
    """Changes when the file, or a file of the folder, changes (a cached read is then stale); None for a Hub id."""
    path = Path(spec)
    if not path.exists():
        return None
    if path.is_file():
        st = path.stat()
        return (st.st_mtime_ns, st.st_size)
    return tuple(sorted(f.stat().st_mtime_ns for f in path.rglob("*") if f.is_file()))


def _read_jsonl(source: Source) -> Rows:
    from lit_sft.formats import read_jsonl

    if source.split is not None and source.split != "train":
        raise UserError(f"{source.split_key}: {source.spec} is one JSONL file, it has no split {source.split!r}")
    path = str(source.spec)
    records = [(f"{path}:{line}", record) for line, record in read_jsonl(path)]
    return Rows(path, (str(Path(path).resolve()), "train"), records, None)


def _read_table(source: Source, what: str) -> Rows:
    import datasets

    datasets.disable_progress_bars()  # one bar per file read is noise beside the training bar
    names, load = _guarded(source, lambda: _splits(source, what))
    name = _pick_split(source, sorted(names))
    label = source.spec if len(names) == 1 and source.split is None else f"{source.spec} (split {name})"
    dataset = _guarded(source, lambda: load(name), label)
    if what == "table" and Path(source.spec).suffix.lower() == ".csv":
        # CSV has no types: a column of numbers is inferred as int or float, but the text is what was written.
        dataset = dataset.cast(datasets.Features({c: datasets.Value("string") for c in dataset.column_names}))
    if len(dataset) == 0:
        raise UserError(f"{label}: empty split (no rows)")
    records = [(f"{label}, row {i}", row) for i, row in enumerate(dataset.to_list())]
    return Rows(label, (_resolved(source.spec), name), records, tuple(dataset.column_names))


def _splits(source: Source, what: str) -> tuple[list[str], Callable[[str], Any]]:
    """The split names of a source, and how to load one (only the split used is read or downloaded)."""
    import datasets

    spec = source.spec
    if what == "disk":
        loaded = datasets.load_from_disk(spec)
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return list(splits), splits.__getitem__
    if what == "table":
        loaded = datasets.load_dataset(TABLE_FILES[Path(spec).suffix.lower()], data_files=spec)
        return list(loaded), loaded.__getitem__
    return datasets.get_dataset_split_names(spec), lambda name: datasets.load_dataset(spec, split=name)


def _guarded(source: Source, call: Callable[[], T], label: str | None = None) -> T:
    """`call()`, with what `datasets` raises for a source turned into one line naming the key."""
    spec = source.spec
    try:
        with _quiet_datasets():
            return call()
    except ConnectionError as err:
        # datasets says "Couldn't reach 'x' on the Hub (OfflineModeIsEnabled)": the reason is the part in brackets.
        why = re.search(r"\(([^()]*)\)$", _first_line(err))
        raise UserError(f"{source.key}: cannot reach Hugging Face dataset {spec!r} ({why.group(1) if why else _first_line(err)}); "
                        "download it online once, or point the key at a local copy") from None
    except ValueError as err:
        if label and "corresponds to no data" in str(err):  # a split whose files hold no rows
            raise UserError(f"{label}: empty split (no rows)") from None
        raise UserError(f"{source.key}: cannot read {spec}: {type(err).__name__}: {_first_line(err)}") from None
    except FileNotFoundError as err:
        where = "no such local file or folder, and not on the Hub" if kind(spec) == "hub" else "no dataset there"
        raise UserError(f"{source.key}: {spec}: {where}: {_first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - arrow, pandas and datasets raise many kinds for a bad file
        _json_lines_problem(spec)
        cause = _root_cause(err)
        raise UserError(f"{source.key}: cannot read {spec}: {type(cause).__name__}: {_first_line(cause)}") from None


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets logs a failed read at ERROR before raising it: the one line we print says it."""
    from datasets.utils import logging as ds_logging

    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)


def _root_cause(err: BaseException) -> BaseException:
    """The error under datasets' "An error occurred while generating the dataset"."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    return err


def _json_lines_problem(spec: str) -> None:
    """A .json file of JSON lines that `datasets` cannot read: our reader names the bad line."""
    import json

    path = Path(spec)
    if path.suffix.lower() != ".json":
        return
    try:
        with path.open("rb") as lines:
            first = json.loads(lines.readline())
    except (OSError, ValueError):
        return  # not JSON lines (one document over several lines): datasets' message stands
    if isinstance(first, dict):
        from lit_sft.formats import read_jsonl

        read_jsonl(path)  # raises UserError at the first bad line


def _pick_split(source: Source, names: list[str]) -> str:
    if source.split is not None:
        if source.split not in names:
            raise UserError(f"{source.split_key}: {source.spec} has no split {source.split!r}; its splits: {', '.join(names)}")
        return source.split
    if len(names) == 1:
        return names[0]
    for name in source.defaults:
        if name in names:
            return name
    raise UserError(f"{source.split_key}: {source.spec} has splits {', '.join(names)} and none of "
                    f"{', '.join(source.defaults)}; name the split with {source.split_key}")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def clear_cache() -> None:
    """Forget every read source (tests that rewrite a file within one mtime tick)."""
    _CACHE.clear()

