from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from esans_sampler import artifact as artifact_module
from esans_sampler import artifact_codec
from esans_sampler.artifact import (
    CodebookArtifact,
    artifact_from_files,
    artifact_to_files,
    load_artifact,
    manifest_of,
    read_artifact_files,
    save_artifact,
)
from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.codebook import Codebook
from esans_sampler.errors import ArtifactError, InvalidInputError, NotFoundError

N, D, K_P, K_S = 60, 4, 5, 3
DATA_FILES = ["codebook.npz", "index.npz", "cluster_choice.npy", "embeddings.npy"]


def _choice(rng: np.random.Generator, k: int) -> npt.NDArray[np.float64]:
    q = rng.random((k, k)) + 0.1
    np.fill_diagonal(q, 0.0)
    out: npt.NDArray[np.float64] = q / q.sum(axis=1, keepdims=True)
    return out


def _artifact(
    seed: int = 0, embeddings: bool = True, metadata: dict[str, Any] | None = None
) -> CodebookArtifact:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    codebook = Codebook(
        modality_names=("a", "b"),
        map_weights=(rng.random((D, 7), dtype=f32), rng.random((D, 5), dtype=f32)),
        map_biases=(rng.random(D, dtype=f32), rng.random(D, dtype=f32)),
        primary_codewords=rng.random((K_P, D), dtype=f32),
        secondary_codewords=rng.random((K_S, 2 * D), dtype=f32),
    )
    ids = rng.permutation(1000)[:N].astype(np.int64) * 3 + 11
    index = ClusterIndex.build(ids, rng.integers(0, K_P, N), rng.integers(0, K_S, N), K_P, K_S)
    return CodebookArtifact(
        codebook=codebook,
        index=index,
        cluster_choice=_choice(rng, K_P),
        embeddings=rng.standard_normal((N, 8)).astype(f32) if embeddings else None,
        metadata={"parameters": {"gamma": 1.0, "K_p": K_P}, "note": "t", "list": [1, 2]}
        if metadata is None
        else metadata,
    )


def _assert_same(a: CodebookArtifact, b: CodebookArtifact) -> None:
    assert a.codebook.modality_names == b.codebook.modality_names
    for x, y in zip(a.codebook.map_weights, b.codebook.map_weights, strict=True):
        assert np.array_equal(x, y) and y.dtype == np.float32
    for x, y in zip(a.codebook.map_biases, b.codebook.map_biases, strict=True):
        assert np.array_equal(x, y)
    assert np.array_equal(a.codebook.primary_codewords, b.codebook.primary_codewords)
    assert np.array_equal(a.codebook.secondary_codewords, b.codebook.secondary_codewords)
    for key in (
        "item_ids",
        "primary",
        "secondary",
        "ordered_ids",
        "ordered_rows",
        "cluster_offsets",
        "fine_offsets",
    ):
        assert np.array_equal(getattr(a.index, key), getattr(b.index, key)), key
    assert (a.index.num_primary, a.index.num_secondary) == (b.index.num_primary, K_S)
    assert np.array_equal(a.cluster_choice, b.cluster_choice)
    assert b.cluster_choice.dtype == np.float64
    if a.embeddings is None:
        assert b.embeddings is None
    else:
        assert b.embeddings is not None and np.array_equal(a.embeddings, b.embeddings)
    assert a.metadata == b.metadata


def _reseal(files: dict[str, bytes]) -> dict[str, bytes]:
    """Recompute the manifest of tampered files so only the content checks can catch them."""
    manifest = json.loads(files["manifest.json"])
    data = {k: v for k, v in files.items() if k != "manifest.json"}
    manifest["files"] = {
        k: {"sha256": hashlib.sha256(v).hexdigest(), "size": len(v)} for k, v in data.items()
    }
    listing = "".join(f"{k}:{manifest['files'][k]['sha256']}\n" for k in sorted(data))
    manifest["version"] = hashlib.sha256(listing.encode()).hexdigest()
    return {**data, "manifest.json": json.dumps(manifest).encode()}


def _npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("embeddings", [True, False])
def test_files_round_trip(embeddings: bool) -> None:
    art = _artifact(embeddings=embeddings)
    files = artifact_to_files(art)
    expected = {"manifest.json", *DATA_FILES[: 4 if embeddings else 3]}
    assert set(files) == expected
    back = artifact_from_files(files)
    _assert_same(art, back)
    assert back.version == art.version and len(art.version) == 64
    assert art.short_version == art.version[:16]
    assert back.num_items == N and back.has_embeddings is embeddings
    manifest = manifest_of(files)
    assert manifest["format"] == "esans-codebook" and manifest["format_version"] == 1
    assert manifest["version"] == art.version and manifest["short_version"] == art.short_version
    assert manifest["summary"]["num_items"] == N
    assert manifest["files"]["codebook.npz"]["size"] == len(files["codebook.npz"])


@pytest.mark.parametrize("embeddings", [True, False])
def test_disk_round_trip(tmp_path: Path, embeddings: bool) -> None:
    art = _artifact(embeddings=embeddings)
    version = save_artifact(art, tmp_path / "deep" / "art")
    assert version == art.version
    back = load_artifact(tmp_path / "deep" / "art")
    _assert_same(art, back)
    assert back.version == version
    assert read_artifact_files(tmp_path / "deep" / "art") == artifact_to_files(art)
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["art"]  # no temp left


def test_data_files_are_plain_npy_and_npz() -> None:
    files = artifact_to_files(_artifact())
    with np.load(io.BytesIO(files["codebook.npz"]), allow_pickle=False) as npz:
        assert list(npz["modality_names"]) == ["a", "b"]
        assert npz["map_weight_1"].shape == (D, 5)
    with np.load(io.BytesIO(files["index.npz"]), allow_pickle=False) as npz:
        assert int(npz["num_primary"]) == K_P
    choice = np.load(io.BytesIO(files["cluster_choice.npy"]), allow_pickle=False)
    assert choice.shape == (K_P, K_P)


def test_version_is_a_content_digest() -> None:
    a = _artifact(seed=0)
    assert artifact_to_files(a) == artifact_to_files(_artifact(seed=0))  # deterministic bytes
    assert _artifact(seed=0, metadata={"created_at": "later"}).version == a.version
    assert _artifact(seed=1).version != a.version
    assert _artifact(seed=0, embeddings=False).version != a.version
    changed = _artifact(seed=0)
    changed.codebook.primary_codewords[0, 0] += 1.0
    assert changed.version != a.version


def test_version_does_not_depend_on_memory_layout() -> None:
    a = _artifact()
    cb = a.codebook
    fortran = Codebook(
        modality_names=cb.modality_names,
        map_weights=tuple(np.asfortranarray(w) for w in cb.map_weights),
        map_biases=cb.map_biases,
        primary_codewords=cb.primary_codewords.astype(">f4"),
        secondary_codewords=cb.secondary_codewords,
    )
    b = CodebookArtifact(fortran, a.index, a.cluster_choice, a.embeddings, a.metadata)
    assert b.version == a.version


def test_metadata_key_order_survives() -> None:
    metadata = {"z": 1, "modalities": {"text": 3, "image": 2, "graph": 1}, "a": None}
    back = artifact_from_files(artifact_to_files(_artifact(metadata=metadata)))
    assert list(back.metadata) == ["z", "modalities", "a"]
    assert list(back.metadata["modalities"]) == ["text", "image", "graph"]


def test_numpy_metadata_values_are_stored_as_json() -> None:
    art = _artifact(metadata={"loss": np.float32(0.5), "sizes": np.arange(3), "n": np.int64(4)})
    back = artifact_from_files(artifact_to_files(art))
    assert back.metadata == {"loss": 0.5, "sizes": [0, 1, 2], "n": 4}


# ----------------------------------------------------------------------------- damage


@pytest.mark.parametrize("name", DATA_FILES)
@pytest.mark.parametrize("position", [0, -1, 0.5])
def test_flipped_byte_is_a_checksum_error(name: str, position: float) -> None:
    files = artifact_to_files(_artifact())
    data = bytearray(files[name])
    i = int(position * len(data)) if isinstance(position, float) else position
    data[i] ^= 0x01
    files[name] = bytes(data)
    with pytest.raises(ArtifactError, match=rf"{name}: checksum mismatch"):
        artifact_from_files(files)


@pytest.mark.parametrize("name", DATA_FILES)
def test_truncated_and_missing_files_are_refused(name: str) -> None:
    files = artifact_to_files(_artifact())
    truncated = {**files, name: files[name][:-10]}
    with pytest.raises(ArtifactError, match=rf"{name}: size .* \(truncated or padded\)"):
        artifact_from_files(truncated, verify=False)
    del files[name]
    with pytest.raises(ArtifactError, match=rf"{name}: file is missing"):
        artifact_from_files(files)


def test_verify_false_skips_only_checksums() -> None:
    files = artifact_to_files(_artifact())
    data = bytearray(files["embeddings.npy"])
    data[-1] ^= 0x01  # flips a float mantissa bit: still a valid array
    files["embeddings.npy"] = bytes(data)
    assert artifact_from_files(files, verify=False).has_embeddings
    with pytest.raises(ArtifactError, match="checksum"):
        artifact_from_files(files, verify=True)


@pytest.mark.parametrize(
    ("manifest", "match"),
    [
        (None, "manifest.json is missing"),
        (b"\xff\xfe garbage", "manifest.json: not valid JSON"),
        (b"{not json", "manifest.json: not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        ({"format": "something-else"}, "unknown format 'something-else'"),
        ({"format_version": 2}, "unsupported format_version 2"),
        ({"files": []}, "'files' must be an object"),
        ({"files": {"../evil.npy": {"sha256": "0", "size": 1}}}, "unexpected file"),
        ({"files": {"index.npz": {"sha256": "0"}}}, "needs a sha256 and a size"),
        ({"metadata": "x"}, "'metadata' must be an object"),
        ({"version": "0" * 64}, "does not match its file list"),
    ],
)
def test_bad_manifests_are_refused(manifest: bytes | dict[str, Any] | None, match: str) -> None:
    files = artifact_to_files(_artifact())
    if manifest is None:
        del files["manifest.json"]
    elif isinstance(manifest, bytes):
        files["manifest.json"] = manifest
    else:
        merged = {**json.loads(files["manifest.json"]), **manifest}
        files["manifest.json"] = json.dumps(merged).encode()
    with pytest.raises(ArtifactError, match=match):
        artifact_from_files(files)


def test_manifest_missing_required_file_entry() -> None:
    files = artifact_to_files(_artifact())
    del files["index.npz"]
    files = _reseal(files)
    with pytest.raises(ArtifactError, match=r"does not list required file index\.npz"):
        artifact_from_files(files)


def _replace_member(files: dict[str, bytes], name: str, **changes: Any) -> dict[str, bytes]:
    with np.load(io.BytesIO(files[name]), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(changes)
    return _reseal({**files, name: _npz(**arrays)})


@pytest.mark.parametrize(
    ("name", "changes", "match"),
    [
        (
            "index.npz",
            {"ordered_rows": np.arange(N, dtype=np.int64)},
            "stored 'ordered_rows' does not match the index rebuilt",
        ),
        (
            "index.npz",
            {"cluster_offsets": np.zeros(K_P + 1, np.int64)},
            "stored 'cluster_offsets' does not match",
        ),
        ("index.npz", {"primary": np.full(N, K_P, np.int32)}, "inconsistent index"),
        ("index.npz", {"item_ids": np.zeros(N, np.int64)}, "inconsistent index .*unique"),
        ("index.npz", {"primary": np.zeros(N, np.float32)}, "'primary' has dtype float32"),
        ("codebook.npz", {"map_bias_1": np.zeros(D + 1, np.float32)}, "inconsistent codebook"),
        ("codebook.npz", {"primary_codewords": np.zeros((K_P + 1, D), np.float32)}, "K_p=6"),
        ("codebook.npz", {"modality_names": np.array(["a", "b", "c"])}, "lacks array"),
        ("codebook.npz", {"map_weight_0": np.array([{"x": 1}] * 3)}, "unreadable array"),
    ],
)
def test_inconsistent_arrays_are_refused(name: str, changes: dict[str, Any], match: str) -> None:
    files = _replace_member(artifact_to_files(_artifact()), name, **changes)
    with pytest.raises(ArtifactError, match=match):
        artifact_from_files(files)


@pytest.mark.parametrize(
    ("name", "array", "match"),
    [
        ("embeddings.npy", np.zeros((N + 1, 8), np.float32), r"embeddings have shape \(61, 8\)"),
        ("embeddings.npy", np.zeros((N, 8), np.float64), "must be float32"),
        ("embeddings.npy", np.full((N, 8), np.nan, np.float32), "NaN or inf"),
        ("embeddings.npy", np.array([{"x": 1}] * N), "not a readable .npy array"),
        ("cluster_choice.npy", np.zeros((K_P, K_P + 1)), r"must be \(5, 5\)"),
        ("cluster_choice.npy", np.full((K_P, K_P), 0.5), "row 0 sums to 2.5"),
        ("cluster_choice.npy", -np.eye(K_P), "non-negative"),
    ],
)
def test_bad_embeddings_and_choice_are_refused(
    name: str, array: npt.NDArray[Any], match: str
) -> None:
    files = artifact_to_files(_artifact())
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    files = _reseal({**files, name: buffer.getvalue()})
    with pytest.raises(ArtifactError, match=rf"{name}: .*{match}"):
        artifact_from_files(files)


def test_npz_given_where_npy_expected_and_vice_versa() -> None:
    files = artifact_to_files(_artifact())
    swapped = _reseal({**files, "cluster_choice.npy": _npz(x=np.eye(K_P))})
    with pytest.raises(ArtifactError, match=r"cluster_choice\.npy: expected a single \.npy array"):
        artifact_from_files(swapped)
    swapped = _reseal({**files, "index.npz": files["cluster_choice.npy"]})
    with pytest.raises(ArtifactError, match=r"index\.npz: expected an \.npz archive"):
        artifact_from_files(swapped)
    swapped = _reseal({**files, "index.npz": b"PK\x03\x04 not a zip"})
    with pytest.raises(ArtifactError, match=r"index\.npz: not a readable \.npz archive"):
        artifact_from_files(swapped)


def test_constructor_validates() -> None:
    good = _artifact()
    zero_row = good.cluster_choice.copy()
    zero_row[2] = 0.0  # an all-zero row (e.g. no other non-empty cluster) is allowed
    CodebookArtifact(good.codebook, good.index, zero_row, None, {})
    other_index = ClusterIndex.build(
        good.index.item_ids, good.index.primary, good.index.secondary, K_P + 1, K_S
    )
    with pytest.raises(ArtifactError, match="index has K_p=6"):
        CodebookArtifact(good.codebook, other_index, good.cluster_choice)
    with pytest.raises(ArtifactError, match="metadata is not JSON-serialisable"):
        CodebookArtifact(good.codebook, good.index, good.cluster_choice, None, {"x": object()})
    with pytest.raises(ArtifactError, match="not JSON-serialisable"):
        CodebookArtifact(good.codebook, good.index, good.cluster_choice, None, {"x": float("nan")})


def test_no_pickle_in_module() -> None:
    source = inspect.getsource(artifact_module) + inspect.getsource(artifact_codec)
    assert "import pickle" not in source and "allow_pickle=True" not in source
    loads = [line for line in source.splitlines() if "np.load(" in line]
    assert loads and all("allow_pickle=False" in line for line in loads)


# ----------------------------------------------------------------------------- disk


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "art"
    first = save_artifact(_artifact(seed=0), target)
    with pytest.raises(ArtifactError, match="already exists; pass overwrite=True"):
        save_artifact(_artifact(seed=1), target)
    assert load_artifact(target).version == first
    second = save_artifact(_artifact(seed=1, embeddings=False), target, overwrite=True)
    assert second != first and load_artifact(target).version == second
    assert not (target / "embeddings.npy").exists()  # old files do not linger
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_save_into_empty_directory_and_over_a_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    save_artifact(_artifact(), empty)
    assert load_artifact(empty).num_items == N
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ArtifactError, match="already exists"):
        save_artifact(_artifact(), a_file)
    save_artifact(_artifact(), a_file, overwrite=True)
    assert load_artifact(a_file).num_items == N


def test_disk_damage_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "art"
    save_artifact(_artifact(), target)
    with pytest.raises(NotFoundError, match="no artifact directory"):
        load_artifact(tmp_path / "absent")
    blob = (target / "index.npz").read_bytes()
    (target / "index.npz").write_bytes(blob[:-1])
    with pytest.raises(ArtifactError, match=r"index\.npz: size"):
        load_artifact(target)
    (target / "index.npz").unlink()
    with pytest.raises(ArtifactError, match=r"index\.npz: file is missing"):
        load_artifact(target)
    (target / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.json is missing"):
        load_artifact(target)


def test_popularity_round_trips_and_is_checked(tmp_path: Path) -> None:
    base = _artifact(seed=3)
    counts = np.arange(base.num_items, dtype=np.float64)
    save_artifact(dataclasses.replace(base, popularity=counts), tmp_path / "a")
    loaded = load_artifact(tmp_path / "a", verify=True)
    assert loaded.popularity is not None
    np.testing.assert_array_equal(loaded.popularity, counts)
    assert loaded.version != base.version
    with pytest.raises(ArtifactError, match="popularity"):
        dataclasses.replace(base, popularity=-counts - 1)
    with pytest.raises(ArtifactError, match="popularity"):
        dataclasses.replace(base, popularity=counts[:-1])


def _per_cluster(art: CodebookArtifact, seed: int = 1) -> CodebookArtifact:
    z_s = np.random.default_rng(seed).random((K_P, K_S, 2 * D), dtype=np.float32)
    codebook = dataclasses.replace(art.codebook, secondary_codewords=z_s)
    return dataclasses.replace(art, codebook=codebook)


def test_per_cluster_secondary_codebook_round_trips() -> None:
    plain = _artifact()
    art = _per_cluster(plain)
    assert art.codebook.secondary_mode == "per_cluster" and art.codebook.num_secondary == K_S
    assert plain.codebook.secondary_mode == "global"
    files = artifact_to_files(art)
    back = artifact_from_files(files)
    np.testing.assert_array_equal(
        back.codebook.secondary_codewords, art.codebook.secondary_codewords
    )
    assert back.version == art.version != plain.version
    assert manifest_of(files)["summary"]["secondary"] == "per_cluster"
    assert manifest_of(artifact_to_files(plain))["summary"]["secondary"] == "global"


def test_per_cluster_assign_uses_each_items_own_cluster() -> None:
    codebook = _per_cluster(_artifact()).codebook
    rng = np.random.default_rng(2)
    features = {"a": rng.random((40, 7)), "b": rng.random((40, 5))}
    primary, secondary = codebook.assign(features, batch_size=16)
    embedded = codebook.embed(features)
    for i in range(40):
        z_p = codebook.primary_codewords[primary[i]]
        r_s = np.concatenate([m[i] - z_p for m in embedded])
        distances = np.linalg.norm(codebook.secondary_codewords[primary[i]] - r_s, axis=1)
        assert secondary[i] == np.argmin(distances)


@pytest.mark.parametrize("shape", [(K_P + 1, K_S, 2 * D), (K_P, K_S, 2 * D + 1), (2, 2, 2, 8)])
def test_per_cluster_codewords_of_the_wrong_shape_are_refused(shape: tuple[int, ...]) -> None:
    codebook = _artifact().codebook
    with pytest.raises(InvalidInputError, match="secondary codewords"):
        dataclasses.replace(codebook, secondary_codewords=np.zeros(shape, dtype=np.float32))
