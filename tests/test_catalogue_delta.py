"""A living catalogue: `esans assign` + `esans publish DELTA` add and retire items without
training, the served version is base + added - retired, and drift is reported."""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import build_random_artifact

from esans_cli.main import main
from esans_sampler.artifact import CodebookArtifact, artifact_to_files, load_artifact
from esans_sampler.catalogue import write_npy_catalogue
from esans_sampler.catalogue_delta import (
    apply_delta,
    assign_delta,
    delta_from_files,
    delta_to_files,
)
from esans_sampler.client import SamplerClient
from esans_sampler.errors import ArtifactError, FailedPreconditionError, InvalidInputError
from esans_sampler.synthetic import make_planted_catalogue
from esans_service.app import ServiceRuntime
from esans_service.deltas import publish_delta
from esans_service.embedded_redis import EmbeddedRedis
from esans_service.harness import local_settings
from esans_service.store import CodebookStore

WIDTHS = {"image": 24, "text": 12}
SMALL = ["--kp", "6", "--ks", "3", "--dm", "16", "--epochs", "2", "--seed", "1", "--quiet"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A real build (MSAC) on 900 planted items, with the MSAC snapshot; the features of
    300 more items from the same distribution are kept aside as new items."""
    planted = make_planted_catalogue(1200, WIDTHS, num_clusters=6, seed=5)
    directory = tmp_path_factory.mktemp("delta-build")
    paths = write_npy_catalogue(
        directory, planted.item_ids[:900], {k: v[:900] for k, v in planted.features.items()}
    )
    out = directory / "artifact"
    argv = ["build", "--ids", str(paths["ids"]), "--out", str(out), "--msac-embeddings"]
    for name in WIDTHS:
        argv += ["--modality", f"{name}={paths[name]}"]
    assert main([*argv, *SMALL]) == 0
    new = {"ids": planted.item_ids[900:], **{k: v[900:] for k, v in planted.features.items()}}
    return out, new


def test_build_records_the_drift_baseline(built: tuple[Path, dict[str, np.ndarray]]) -> None:
    artifact = load_artifact(built[0])
    baseline = artifact.metadata["quantisation_error"]
    assert baseline["count"] == 900 and 0 < baseline["p50"] <= baseline["p90"]
    assert sum(artifact.metadata["build_cluster_sizes"]) == 900
    assert artifact.metadata["embeddings"]["source"] == "msac"


def test_apply_delta_is_base_plus_added_minus_retired(
    built: tuple[Path, dict[str, np.ndarray]],
) -> None:
    base = load_artifact(built[0])
    _, new = built
    retired = base.index.item_ids[:25]
    features = {k: new[k][:40] for k in WIDTHS}
    delta = assign_delta(base, new["ids"][:40], features, retired_ids=retired)
    primary, secondary = base.codebook.assign(features)
    np.testing.assert_array_equal(delta.added_primary, primary)
    np.testing.assert_array_equal(delta.added_secondary, secondary)
    # The files round-trip, and applying them gives the expected catalogue.
    delta = delta_from_files(delta_to_files(delta))
    updated = apply_delta(base, delta)
    assert updated.num_items == 900 - 25 + 40
    assert not np.isin(retired, updated.index.item_ids).any()
    rows = updated.index.rows_of(new["ids"][:40])
    np.testing.assert_array_equal(updated.index.primary[rows], primary)
    assert updated.embeddings is not None and updated.embeddings.shape == (915, 16)
    np.testing.assert_allclose(updated.cluster_choice.sum(axis=1), 1.0, atol=1e-9)
    assert updated.metadata["delta"]["added"] == 40
    assert updated.metadata["delta"]["base_version"] == base.version
    # A second delta counts what was added since the build, not since the last delta.
    second = assign_delta(updated, new["ids"][40:60], {k: new[k][40:60] for k in WIDTHS})
    assert second.drift["added_since_build"] == 60
    with pytest.raises(ArtifactError, match="assigned against"):
        apply_delta(base, second)


def test_drift_report_tells_in_distribution_from_shifted_items(
    built: tuple[Path, dict[str, np.ndarray]],
) -> None:
    base = load_artifact(built[0])
    _, new = built
    same = assign_delta(base, new["ids"][:100], {k: new[k][:100] for k in WIDTHS})
    assert same.drift["error_ratio_p50"] == pytest.approx(1.0, abs=0.2)
    assert not same.drift["rebuild"], same.drift["recommendation"]
    rng = np.random.default_rng(0)
    shifted = {
        k: rng.normal(size=(100, width)).astype(np.float32) * 3 for k, width in WIDTHS.items()
    }
    moved = assign_delta(base, new["ids"][:100], shifted)
    assert moved.drift["error_ratio_p50"] > 1.25
    assert moved.drift["rebuild"] and "rebuild the codebook" in moved.drift["recommendation"]
    # Many items at once: the added share alone asks for a rebuild.
    bulk = assign_delta(base, new["ids"], {k: new[k] for k in WIDTHS})
    assert bulk.drift["added_share_since_build"] == pytest.approx(300 / 900)
    assert "added since the build" in bulk.drift["recommendation"]


def test_a_bad_fit_keeps_asking_for_a_rebuild_after_later_good_deltas(
    built: tuple[Path, dict[str, np.ndarray]],
) -> None:
    base = load_artifact(built[0])
    _, new = built
    rng = np.random.default_rng(1)
    shifted = {k: rng.normal(size=(20, w)).astype(np.float32) * 3 for k, w in WIDTHS.items()}
    first = assign_delta(base, new["ids"][:20], shifted)
    assert first.drift["rebuild"]
    after = apply_delta(base, first)
    good = assign_delta(after, new["ids"][20:140], {k: new[k][20:140] for k in WIDTHS})
    assert good.drift["error_ratio_p50"] == pytest.approx(1.0, abs=0.2)
    assert good.drift["error_ratio_since_build"] == first.drift["error_ratio_p50"]
    assert good.drift["rebuild"] and "earlier delta" in good.drift["recommendation"]


def test_bad_deltas_are_refused(built: tuple[Path, dict[str, np.ndarray]]) -> None:
    base = load_artifact(built[0])
    _, new = built
    features = {k: new[k][:3] for k in WIDTHS}
    with pytest.raises(InvalidInputError, match="already in the catalogue"):
        assign_delta(base, base.index.item_ids[:3], features)
    with pytest.raises(InvalidInputError, match="not in the catalogue"):
        assign_delta(base, new["ids"][:3], features, retired_ids=[7])
    with pytest.raises(InvalidInputError, match="repeat"):
        assign_delta(base, np.array([new["ids"][0]] * 3), features)
    with pytest.raises(InvalidInputError, match="rows for"):
        assign_delta(base, new["ids"][:4], features)
    with pytest.raises(ArtifactError, match="not an esans-delta manifest"):
        delta_from_files({"delta.json": b"{}", "delta.npz": b"junk"})
    manifest = b'{"format": "esans-delta", "base_version": "x"}'
    with pytest.raises(ArtifactError, match="not a readable catalogue delta"):
        delta_from_files({"delta.json": manifest, "delta.npz": b"junk"})
    # A snapshot from the trainer's own tower needs the new items' rows.
    tower = build_random_artifact(seed=3, metadata={"embeddings": {"dim": 8, "source": "file"}})
    with pytest.raises(InvalidInputError, match="--embeddings"):
        assign_delta(tower, [10**9], {"image": np.ones((1, 12)), "text": np.ones((1, 6))})


@pytest.fixture
def serving(redis_server: EmbeddedRedis) -> Iterator[ServiceRuntime]:
    runtime = ServiceRuntime(
        local_settings(redis_server.url, "delta", poll_interval_s=0.5, admin_token="d" * 24)
    ).start()
    yield runtime
    runtime.stop(grace=0)


def _publish_base(redis_server: EmbeddedRedis, artifact: CodebookArtifact) -> None:
    with redis_server.client() as client:
        CodebookStore(client, namespace="delta").publish(artifact_to_files(artifact))


def test_published_delta_serves_new_items_and_never_retired_ones(
    built: tuple[Path, dict[str, np.ndarray]],
    redis_server: EmbeddedRedis,
    serving: ServiceRuntime,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    artifact_dir, new = built
    base = load_artifact(artifact_dir)
    _publish_base(redis_server, base)
    retired = base.index.item_ids[:30]
    ids_path, retire_path = tmp_path / "new.npy", tmp_path / "retire.npy"
    np.save(ids_path, new["ids"][:20])
    np.save(retire_path, retired)
    argv = ["assign", str(artifact_dir), "--ids", str(ids_path), "--retire", str(retire_path)]
    for name in WIDTHS:
        np.save(tmp_path / f"{name}.npy", new[name][:20])
        argv += ["--modality", f"{name}={tmp_path / f'{name}.npy'}"]
    assert main([*argv, "--out", str(tmp_path / "delta")]) == 0
    printed = capsys.readouterr().out
    assert "quantisation error" in printed and "no rebuild needed" in printed
    assert main(["publish", str(tmp_path / "delta"), "--redis-url", redis_server.url,
                 "--namespace", "delta"]) == 0  # fmt: skip
    assert "+20 -30 items" in capsys.readouterr().out

    target = f"127.0.0.1:{serving.grpc_port}"

    def serving_new() -> bool:
        return serving.registry.get().artifact.num_items == 890

    deadline = time.monotonic() + 20
    while not serving_new():
        assert time.monotonic() < deadline, "the replica did not swap to the delta's version"
        time.sleep(0.05)
    with SamplerClient(target, retries=0) as client:
        # New items are positives, with hard negatives, and come back as negatives.
        reply = client.sample(new["ids"][:20], m_h=3, seed=1)
        assert reply.codebook_version == serving.registry.active_version
        seen: set[int] = set()
        for seed in range(60):
            uniform = client.sample(base.index.item_ids[100:612], sampler="uniform", seed=seed)
            seen |= set(uniform.simple_ids.ravel().tolist())
            np.testing.assert_allclose(np.exp(uniform.simple_log_q), 1 / 889, rtol=1e-5)
        assert set(new["ids"][:20].tolist()) & seen, "no new item came back as a negative"
        assert not set(retired.tolist()) & seen, "a retired item was served"
        with pytest.raises(InvalidInputError, match="not in the codebook"):
            client.sample(retired[:2])


def test_a_delta_whose_base_is_no_longer_active_is_refused_unless_allowed(
    redis_server: EmbeddedRedis,
) -> None:
    base = build_random_artifact(seed=13, num_items=300, dim=4)
    delta = assign_delta(base, [10**9], {"image": np.ones((1, 12)), "text": np.ones((1, 6))})
    with redis_server.client() as client:
        store = CodebookStore(client, namespace="stale-delta")
        store.publish(artifact_to_files(base))
        newer = store.publish(artifact_to_files(build_random_artifact(seed=14, dim=4)))
        with pytest.raises(FailedPreconditionError, match="active now"):
            publish_delta(store, delta_to_files(delta))
        assert store.active_version() == newer
        version, _ = publish_delta(store, delta_to_files(delta), allow_stale_base=True)
        assert store.active_version() == version


def test_admin_upload_of_a_delta_publishes_it(
    built: tuple[Path, dict[str, np.ndarray]], redis_server: EmbeddedRedis, serving: ServiceRuntime
) -> None:
    base = build_random_artifact(seed=12, num_items=300, dim=4)
    _publish_base(redis_server, base)
    delta = assign_delta(
        base, [10**9, 10**9 + 1], {"image": np.ones((2, 12)), "text": np.ones((2, 6))}
    )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in delta_to_files(delta).items():
            info = tarfile.TarInfo(f"delta/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    reply = httpx.post(
        f"http://127.0.0.1:{serving.http_port}/admin/artifacts",
        content=buffer.getvalue(),
        headers={"authorization": f"Bearer {'d' * 24}", "content-type": "application/gzip"},
    )
    assert reply.status_code == 200, reply.text
    assert serving.registry.get().artifact.num_items == 302
    with redis_server.client() as client:
        store = CodebookStore(client, namespace="delta")
        # Its base is no longer active now; forced, the same delta is the same content.
        again = publish_delta(store, delta_to_files(delta), allow_stale_base=True)
        assert again[0] == reply.json()["version"]
