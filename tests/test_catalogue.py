from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esans_sampler.catalogue import (
    Catalogue,
    file_sha256,
    load_npy_catalogue,
    load_parquet_catalogue,
    validate_catalogue,
    write_npy_catalogue,
)
from esans_sampler.errors import CatalogueError, InvalidInputError

N = 50


def _features(seed: int = 0) -> tuple[npt.NDArray[np.int64], dict[str, npt.NDArray[Any]]]:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(10_000)[:N].astype(np.int64) + 7
    feats = {
        "image": rng.standard_normal((N, 6)).astype(np.float32),
        "text.v2": rng.standard_normal((N, 3)).astype(np.float32),
    }
    return ids, feats


def _write(tmp_path: Path, ids: Any = None, **override: Any) -> dict[str, Path]:
    base_ids, feats = _features()
    feats.update(override)
    return write_npy_catalogue(tmp_path, base_ids if ids is None else ids, feats)


def _load(paths: dict[str, Path]) -> Catalogue:
    return load_npy_catalogue(paths["ids"], {k: v for k, v in paths.items() if k != "ids"})


# ----------------------------------------------------------------------------- npy


def test_npy_round_trip_memory_maps_features(tmp_path: Path) -> None:
    ids, feats = _features()
    cat = _load(write_npy_catalogue(tmp_path, ids, feats))
    assert cat.item_ids.dtype == np.int64
    assert np.array_equal(cat.item_ids, ids)
    assert cat.modality_names == ("image", "text.v2")
    assert cat.widths == {"image": 6, "text.v2": 3}
    assert cat.num_items == N
    assert cat.feature_bytes == N * (6 + 3) * 4
    for name, array in feats.items():
        assert isinstance(cat.modalities[name], np.memmap)
        assert np.array_equal(cat.modalities[name], array)
        assert cat.sources[name] == str(tmp_path / f"{name}.npy")
    assert cat.sources["ids"] == str(tmp_path / "ids.npy")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_rows_casts_each_batch_to_float32(tmp_path: Path, dtype: type[np.floating[Any]]) -> None:
    ids, feats = _features()
    cat = _load(write_npy_catalogue(tmp_path, ids, {k: v.astype(dtype) for k, v in feats.items()}))
    assert cat.modalities["image"].dtype == dtype
    batch = cat.rows(10, 20)
    assert [b.shape for b in batch] == [(10, 6), (10, 3)]
    for b, name in zip(batch, cat.modality_names, strict=True):
        assert b.dtype == np.float32
        assert b.flags.writeable and not isinstance(b, np.memmap)
        assert np.array_equal(b, feats[name][10:20].astype(dtype).astype(np.float32))


def test_rows_clamps_stop_and_refuses_bad_ranges(tmp_path: Path) -> None:
    cat = _load(_write(tmp_path))
    assert cat.rows(45, 1000)[0].shape == (5, 6)
    assert cat.rows(N, N + 10)[1].shape == (0, 3)
    for start, stop in [(-1, 3), (5, 2)]:
        with pytest.raises(InvalidInputError, match="invalid row range"):
            cat.rows(start, stop)


@pytest.mark.parametrize("ids_dtype", [np.int32, np.uint16, np.int64])
def test_integer_id_dtypes_are_converted_to_int64(tmp_path: Path, ids_dtype: type[Any]) -> None:
    cat = _load(_write(tmp_path, ids=np.arange(N, dtype=ids_dtype)))
    assert cat.item_ids.dtype == np.int64
    assert np.array_equal(cat.item_ids, np.arange(N))


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (np.arange(N, dtype=np.float64), r"ids\.npy: item ids must be integers, got dtype float64"),
        (np.arange(N).reshape(5, 10), r"ids\.npy: item ids must be 1-D, got shape \(5, 10\)"),
        (np.array([], dtype=np.int64), r"ids\.npy: the catalogue is empty"),
        (
            np.r_[np.arange(N - 3), [4, 4, 9]],
            r"ids\.npy: item ids must be unique; duplicated: 4, 9",
        ),
        (np.full(N, 2**63, dtype=np.uint64), r"must fit in int64"),
    ],
)
def test_bad_ids_are_refused(tmp_path: Path, ids: npt.NDArray[Any], match: str) -> None:
    with pytest.raises(CatalogueError, match=match):
        _load(_write(tmp_path, ids=ids))


def test_many_duplicates_are_summarised(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match=r"duplicated: 0, 1, 2, 3, 4 and 20 more"):
        _load(_write(tmp_path, ids=np.arange(N) // 2))


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros(N, np.float32), r"image\.npy: modality 'image' must be 2-D"),
        (np.zeros((N, 2, 2), np.float32), r"must be 2-D \(items x features\), got shape"),
        (np.zeros((N, 4), np.int32), r"image\.npy: modality 'image' must hold real floats"),
        (np.zeros((N, 4), np.complex64), r"must hold real floats, got dtype complex64"),
        (np.zeros((N, 0), np.float32), r"image\.npy: modality 'image' has width 0"),
        (
            np.zeros((N - 1, 6), np.float32),
            rf"image\.npy: modality 'image' has {N - 1} rows but the ids file .*ids\.npy has {N}",
        ),
    ],
)
def test_bad_modality_matrices_are_refused(
    tmp_path: Path, array: npt.NDArray[Any], match: str
) -> None:
    with pytest.raises(CatalogueError, match=match):
        _load(_write(tmp_path, image=array))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("chunk_rows", [1, 7, 65_536])
def test_non_finite_values_name_file_and_first_row(
    tmp_path: Path, bad: float, chunk_rows: int
) -> None:
    ids, feats = _features()
    feats["text.v2"] = feats["text.v2"].astype(np.float64)
    feats["text.v2"][[17, 33], 1] = bad
    paths = write_npy_catalogue(tmp_path, ids, feats)
    raw = Catalogue(
        item_ids=ids,
        modalities={k: np.load(paths[k], mmap_mode="r") for k in feats},
        sources={k: str(v) for k, v in paths.items()},
    )
    with pytest.raises(
        CatalogueError, match=rf"text\.v2\.npy: .*NaN or inf, first at row 17 \(item id {ids[17]}\)"
    ):
        validate_catalogue(raw, chunk_rows=chunk_rows)


def test_non_finite_refused_by_loader(tmp_path: Path) -> None:
    image = _features()[1]["image"].copy()
    image[3, 0] = np.nan
    with pytest.raises(CatalogueError, match=r"image\.npy: .*first at row 3"):
        _load(_write(tmp_path, image=image))


def test_chunk_rows_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="chunk_rows"):
        validate_catalogue(_load(_write(tmp_path)), chunk_rows=0)


def test_no_modality_is_refused(tmp_path: Path) -> None:
    paths = write_npy_catalogue(tmp_path, np.arange(N), {})
    with pytest.raises(CatalogueError, match=r"no modality \(M = 0\)"):
        load_npy_catalogue(paths["ids"], {})


@pytest.mark.parametrize("name", ["", "a/b", "has space", "ids", "ü", "../x"])
def test_bad_modality_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(CatalogueError, match="modality name"):
        load_npy_catalogue(tmp_path / "ids.npy", {name: tmp_path / "x.npy"})
    with pytest.raises(CatalogueError, match="modality name"):
        write_npy_catalogue(tmp_path, np.arange(3), {name: np.zeros((3, 1))})


def test_missing_files_are_named(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    paths["image"].unlink()
    with pytest.raises(CatalogueError, match=r"image\.npy: file not found"):
        _load(paths)
    with pytest.raises(CatalogueError, match=r"nope\.npy: file not found"):
        load_npy_catalogue(tmp_path / "nope.npy", {"image": paths["text.v2"]})


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"this is not an npy file", "not a readable .npy array"),
        (b"", "not a readable .npy array"),
        ("truncated", "not a readable .npy array"),
        ("object", "not a readable .npy array"),
        ("npz", "expected a single .npy array, got an .npz archive"),
    ],
)
def test_garbage_files_are_wrapped(tmp_path: Path, content: bytes | str, match: str) -> None:
    paths = _write(tmp_path)
    target = paths["text.v2"]
    if content == "truncated":
        target.write_bytes(target.read_bytes()[:-40])
    elif content == "object":
        np.save(target, np.array([{"a": 1}] * N, dtype=object), allow_pickle=True)
    elif content == "npz":
        with target.open("wb") as handle:
            np.savez(handle, x=np.zeros((N, 3)))
    else:
        assert isinstance(content, bytes)
        target.write_bytes(content)
    with pytest.raises(CatalogueError, match=rf"text\.v2\.npy: {match}"):
        _load(paths)


def test_validate_accepts_in_memory_catalogue() -> None:
    ids, feats = _features()
    validate_catalogue(Catalogue(item_ids=ids, modalities=dict(feats), sources={}))
    bad = Catalogue(item_ids=ids.astype(np.float32), modalities=dict(feats), sources={})
    with pytest.raises(CatalogueError, match=r"<ids>: item ids must be integers"):
        validate_catalogue(bad)


# ----------------------------------------------------------------------------- parquet


def _parquet(path: Path, columns: dict[str, Any], schema: pa.Schema | None = None) -> Path:
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("value_type", [pa.float32(), pa.float64()])
def test_parquet_round_trip(tmp_path: Path, fixed: bool, value_type: pa.DataType) -> None:
    ids, feats = _features()
    fields, columns = [pa.field("item_id", pa.int64())], {"item_id": ids}
    for name, array in feats.items():
        list_type = pa.list_(value_type, array.shape[1] if fixed else -1)
        fields.append(pa.field(name, list_type))
        columns[name] = pa.array(list(array.astype(value_type.to_pandas_dtype())), list_type)
    path = _parquet(tmp_path / "cat.parquet", columns, pa.schema(fields))
    cat = load_parquet_catalogue(path)
    assert cat.modality_names == ("image", "text.v2")
    assert cat.item_ids.dtype == np.int64 and np.array_equal(cat.item_ids, ids)
    assert set(cat.sources.values()) == {str(path)}
    for name, array in feats.items():
        assert cat.modalities[name].dtype == value_type.to_pandas_dtype()
        assert np.array_equal(cat.modalities[name], array.astype(value_type.to_pandas_dtype()))
    assert all(b.dtype == np.float32 for b in cat.rows(0, 5))


def test_parquet_selected_columns_and_id_column(tmp_path: Path) -> None:
    ids, feats = _features()
    columns = {"sku": ids.astype(np.int32), **{k: list(v) for k, v in feats.items()}}
    columns["note"] = ["x"] * N
    path = _parquet(tmp_path / "cat.parquet", columns)
    cat = load_parquet_catalogue(path, id_column="sku", modality_columns=["text.v2"])
    assert cat.modality_names == ("text.v2",)
    assert np.array_equal(cat.modalities["text.v2"], feats["text.v2"])
    with pytest.raises(CatalogueError, match=r"modality column 'note' must be a list of floats"):
        load_parquet_catalogue(path, id_column="sku")


def test_parquet_ragged_lists_are_refused(tmp_path: Path) -> None:
    ids, feats = _features()
    rows = [list(r) for r in feats["image"]]
    rows[12] = rows[12][:4]
    path = _parquet(tmp_path / "cat.parquet", {"item_id": ids, "image": rows})
    with pytest.raises(
        CatalogueError, match=r"cat\.parquet: modality column 'image' is ragged: .* row 12 has 4"
    ):
        load_parquet_catalogue(path)


@pytest.mark.parametrize(
    ("columns", "kwargs", "match"),
    [
        ({"item_id": [1, 2]}, {}, r"no modality \(M = 0\)"),
        ({"item_id": [1.0, 2.0], "a": [[1.0], [2.0]]}, {}, "id column 'item_id' must be integers"),
        (
            {"item_id": [1, None], "a": [[1.0], [2.0]]},
            {},
            "id column 'item_id' has a null at row 1",
        ),
        ({"item_id": [1, 2], "a": [[1.0], None]}, {}, "has a null list at row 1"),
        ({"item_id": [1, 2], "a": [[1.0], [None]]}, {}, "contains null values"),
        ({"item_id": [1, 2], "a": [[1.0], [float("nan")]]}, {}, "NaN or inf, first at row 1"),
        ({"item_id": [1, 1], "a": [[1.0], [2.0]]}, {}, "duplicated: 1"),
        ({"item_id": [1, 2], "a": [[1], [2]]}, {}, "must be a list of floats"),
        (
            {"item_id": [1, 2], "a": pa.array([[], []], pa.list_(pa.float32()))},
            {},
            "modality 'a' has width 0",
        ),
        ({"id": [1, 2], "a": [[1.0], [2.0]]}, {}, r"no id column 'item_id'; columns are \['id'"),
        ({"item_id": [1, 2], "a": [[1.0], [2.0]]}, {"modality_columns": ["b"]}, r"no column"),
        ({"item_id": [1, 2], "a b": [[1.0], [2.0]]}, {}, "invalid modality name 'a b'"),
        (
            {"item_id": [1, 2], "a": [[1.0], [2.0]]},
            {"modality_columns": ["item_id"]},
            "cannot also be a modality",
        ),
    ],
)
def test_parquet_errors(
    tmp_path: Path, columns: dict[str, Any], kwargs: dict[str, Any], match: str
) -> None:
    path = _parquet(tmp_path / "cat.parquet", columns)
    with pytest.raises(CatalogueError, match=match):
        load_parquet_catalogue(path, **kwargs)


def test_parquet_empty_missing_and_garbage(tmp_path: Path) -> None:
    schema = pa.schema([("item_id", pa.int64()), ("a", pa.list_(pa.float32()))])
    empty = _parquet(tmp_path / "empty.parquet", {"item_id": [], "a": []}, schema)
    with pytest.raises(CatalogueError, match=r"empty\.parquet: the catalogue is empty"):
        load_parquet_catalogue(empty)
    with pytest.raises(CatalogueError, match=r"absent\.parquet: file not found"):
        load_parquet_catalogue(tmp_path / "absent.parquet")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 not really parquet at all")
    with pytest.raises(CatalogueError, match=r"garbage\.parquet: not a readable Parquet file"):
        load_parquet_catalogue(garbage)


# ----------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("size", [0, 5, (1 << 20) + 3])
def test_file_sha256_streams(tmp_path: Path, size: int) -> None:
    data = np.random.default_rng(size).bytes(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    with pytest.raises(CatalogueError, match="file not found"):
        file_sha256(tmp_path / "absent")


def test_write_npy_catalogue_keeps_dtypes(tmp_path: Path) -> None:
    paths = write_npy_catalogue(
        tmp_path / "new" / "dir", [3, 1, 2], {"a": np.ones((3, 2), np.float16)}
    )
    assert set(paths) == {"ids", "a"}
    assert np.load(paths["a"], allow_pickle=False).dtype == np.float16
    assert np.array_equal(np.load(paths["ids"], allow_pickle=False), [3, 1, 2])
