"""The HTTP transport against real servers (port 0) and a real Redis."""

from __future__ import annotations

import datetime as dt
import io
import math
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from conftest import build_random_artifact

from esans_sampler.artifact import artifact_to_files, save_artifact
from esans_sampler.contract._proto.esans.v1 import sampler_pb2, sampler_pb2_grpc
from esans_sampler.contract.tensors import from_json, from_tensor
from esans_service.app import ServiceRuntime
from esans_service.embedded_redis import EmbeddedRedis
from esans_service.harness import local_settings
from esans_service.settings import Settings
from esans_service.store import CodebookStore

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TENSORS = [
    "positive_primary",
    "positive_secondary",
    "simple_ids",
    "simple_clusters",
    "simple_log_q",
    "hard_ids",
    "hard_counts",
    "hard_log_q",
]
EMBEDDING_TENSORS = [
    "positive",
    "simple",
    "hard",
    "virtual_simple",
    "simple_weights",
    "virtual_hard",
]


def _settings(redis_url: str, namespace: str, **overrides: Any) -> Settings:
    return local_settings(redis_url, namespace, **({"max_concurrency": 1} | overrides))


@pytest.fixture(scope="module")
def runtime(redis_server: EmbeddedRedis) -> Iterator[ServiceRuntime]:
    with redis_server.client() as client:
        store = CodebookStore(client, namespace="http")
        store.publish(artifact_to_files(build_random_artifact(seed=2, embeddings=False)), False)
        store.publish(artifact_to_files(build_random_artifact(seed=1)))
    runtime = ServiceRuntime(_settings(redis_server.url, "http", admin_token=TOKEN)).start()
    try:
        yield runtime
    finally:
        runtime.stop(grace=0)


@pytest.fixture(scope="module")
def http(runtime: ServiceRuntime) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{runtime.http_port}", timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def empty(redis_server: EmbeddedRedis) -> Iterator[httpx.Client]:
    """A replica whose store holds nothing, with the admin API disabled."""
    runtime = ServiceRuntime(_settings(redis_server.url, "http-empty")).start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{runtime.http_port}", timeout=10) as client:
            yield client
    finally:
        runtime.stop(grace=0)


@pytest.fixture(scope="module")
def ids(runtime: ServiceRuntime) -> list[int]:
    return [int(i) for i in runtime.registry.get(None).artifact.index.item_ids[:8]]


@pytest.fixture(scope="module")
def plain_version(runtime: ServiceRuntime) -> str:
    return next(v.version for v in runtime.store.versions() if not v.active)


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    message: str = body["error"]["message"]
    assert message and "Traceback" not in message
    return message


def _decode(body: dict[str, Any], name: str) -> np.ndarray:
    return from_json(body[name], null=-math.inf if name.endswith("log_q") else math.nan)


def test_grpc_and_http_give_identical_arrays(
    http: httpx.Client, runtime: ServiceRuntime, ids: list[int]
) -> None:
    # Clusters hold 25 items, so m_h=30 forces padding (-1 ids, -inf log q).
    fields = {"m_c": 3, "m_o": 4, "m_h": 30, "gamma": 2.0, "seed": 11, "return_embeddings": True}
    response = http.post("/v1/sample", json={"positive_ids": ids, **fields})
    assert response.status_code == 200, response.text
    body = response.json()
    with grpc.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
        stub = sampler_pb2_grpc.NegativeSamplerStub(channel)
        proto = stub.SampleNegatives(
            sampler_pb2.SampleNegativesRequest(positive_ids=ids, **fields), timeout=10
        )
    assert body["codebook_version"] == proto.codebook_version == runtime.registry.active_version
    assert body["sampler"] == "SAMPLER_KIND_ESANS"
    for name in TENSORS:
        expected = from_tensor(getattr(proto, name))
        decoded = _decode(body, name)
        assert decoded.dtype == expected.dtype, name
        np.testing.assert_array_equal(decoded, expected, err_msg=name)
    assert np.isneginf(_decode(body, "hard_log_q")).any()  # padding came through as null
    for name in EMBEDDING_TENSORS:
        expected = from_tensor(getattr(proto.embeddings, name))
        np.testing.assert_array_equal(_decode(body["embeddings"], name), expected, err_msg=name)
    assert body["embeddings"]["eta"] == proto.embeddings.eta == 0.6


def test_defaults_and_sampler_names(http: httpx.Client, ids: list[int]) -> None:
    body = http.post("/v1/sample", json={"positive_ids": ids}).json()
    assert body["simple_ids"]["shape"] == [8, 2, 5] and body["embeddings"] is None
    for name, expected in [
        ("uniform", "SAMPLER_KIND_UNIFORM"),
        ("SAMPLER_KIND_MIXED", "SAMPLER_KIND_MIXED"),
        ("SAMPLER_KIND_UNSPECIFIED", "SAMPLER_KIND_ESANS"),
    ]:
        response = http.post("/v1/sample", json={"positive_ids": ids, "sampler": name})
        assert response.json()["sampler"] == expected


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"positive_ids": []}, "between 1 and"),
        ({"m_c": 0}, "m_c=0"),
        ({"m_o": 100}, "m_o=100"),
        ({"m_h": -1}, "m_h=-1"),
        ({"gamma": -1}, "gamma"),
        ({"hard_lambda": 1.5}, "hard_lambda"),
        ({"sampler": "best"}, "unknown sampler"),
        ({"seed": -3}, "seed"),
        ({"positive_ids": [1, 2]}, "not in the codebook"),
        ({"positive_ids": None}, "positive_ids"),
        ({"positive_ids": "1,2"}, "positive_ids"),
        ({"m_c": "2"}, "m_c"),
        ({"m_c": 2.5}, "m_c"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_invalid_requests_get_422(
    http: httpx.Client, ids: list[int], body: dict[str, Any], match: str
) -> None:
    response = http.post("/v1/sample", json={"positive_ids": ids, **body})
    assert match in _error(response, 422, "INVALID_ARGUMENT")


def test_nan_is_refused(http: httpx.Client, ids: list[int]) -> None:
    content = f'{{"positive_ids": {ids}, "eta": NaN}}'
    response = http.post(
        "/v1/sample", content=content, headers={"Content-Type": "application/json"}
    )
    assert "eta" in _error(response, 422, "INVALID_ARGUMENT")


def test_malformed_json_gets_422(http: httpx.Client) -> None:
    response = http.post(
        "/v1/sample", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    _error(response, 422, "INVALID_ARGUMENT")


def test_not_found(http: httpx.Client, ids: list[int]) -> None:
    body = {"positive_ids": ids, "codebook_version": "0" * 64}
    _error(http.post("/v1/sample", json=body), 404, "NOT_FOUND")
    _error(http.get("/v1/codebook", params={"version": "0" * 64}), 404, "NOT_FOUND")
    _error(http.get("/v1/no-such-route"), 404, "NOT_FOUND")


@pytest.mark.parametrize("field", [{"return_embeddings": True}, {"sampler": "popularity"}])
def test_failed_precondition_is_409(
    http: httpx.Client, runtime: ServiceRuntime, plain_version: str, field: dict[str, Any]
) -> None:
    plain_ids = runtime.registry.get(plain_version).artifact.index.item_ids[:4].tolist()
    body = {"positive_ids": plain_ids, "codebook_version": plain_version, **field}
    _error(http.post("/v1/sample", json=body), 409, "FAILED_PRECONDITION")


def test_overload_is_429(http: httpx.Client, runtime: ServiceRuntime, ids: list[int]) -> None:
    with runtime.service.admitted():
        response = http.post("/v1/sample", json={"positive_ids": ids})
    assert "max_concurrency" in _error(response, 429, "RESOURCE_EXHAUSTED")
    assert http.post("/v1/sample", json={"positive_ids": ids}).status_code == 200


def test_nothing_published_is_503(empty: httpx.Client) -> None:
    _error(empty.post("/v1/sample", json={"positive_ids": [1]}), 503, "UNAVAILABLE")
    _error(empty.get("/v1/codebook"), 503, "UNAVAILABLE")


def test_codebook_info(http: httpx.Client, runtime: ServiceRuntime, plain_version: str) -> None:
    info = http.get("/v1/codebook").json()
    assert info["version"] == runtime.registry.active_version and info["active"]
    assert info["num_items"] == 200 and info["embedding_dim"] == 8 and not info["stale"]
    assert info["secondary_quantisation"] == "global" and info["hard_candidate_m_h"] == 5
    assert 0 < info["hard_candidate_share"] <= 1
    pinned = http.get("/v1/codebook", params={"version": plain_version}).json()
    assert pinned["version"] == plain_version and not pinned["active"]
    assert pinned["embedding_dim"] == 0


def test_probes(http: httpx.Client, empty: httpx.Client, runtime: ServiceRuntime) -> None:
    assert http.get("/healthz").json() == {"status": "alive"}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() | {"stale_reason": None} == {
        "ready": True,
        "serving": "store",
        "codebook_version": runtime.registry.active_version,
        "redis": "reachable",
        "stale": False,
        "stale_reason": None,
        "draining": False,
    }
    assert empty.get("/healthz").status_code == 200
    not_ready = empty.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["serving"] == "nothing" and not not_ready.json()["ready"]


def test_metrics(http: httpx.Client, ids: list[int]) -> None:
    before = _sample_value(http, 'esans_hard_slots_requested_total{sampler="esans"}')
    http.post("/v1/sample", json={"positive_ids": ids, "m_h": 3})
    text = http.get("/metrics").text
    after = _sample_value(http, 'esans_hard_slots_requested_total{sampler="esans"}')
    assert after - before == 3 * len(ids)  # B * m_h slots, filled or not
    assert 'esans_requests_total{method="/v1/sample",status="200",transport="http"}' in text
    assert "esans_request_latency_seconds_bucket" in text
    assert 'esans_negatives_served_total{kind="simple",sampler="esans"}' in text
    assert "esans_active_codebook_info{version=" in text
    assert "esans_codebook_stale 0.0" in text


def _sample_value(http: httpx.Client, sample: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[1])
    return 0.0


# ----------------------------------------------------------------------------- admin


def _artifact_dir(tmp_path: Path, seed: int) -> tuple[Path, str]:
    directory = tmp_path / f"artifact-{seed}"
    version = save_artifact(build_random_artifact(seed=seed), directory)
    return directory, version


def _tar_gz(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(directory, arcname=directory.name)
    return buffer.getvalue()


def _zip(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(directory.iterdir()):
            archive.write(path, f"{directory.name}/{path.name}")
    return buffer.getvalue()


def _versions(runtime: ServiceRuntime) -> list[tuple[str, bool]]:
    return [(v.version, v.active) for v in runtime.store.versions()]


ADMIN_CALLS = [
    ("GET", "/admin/versions"),
    ("POST", "/admin/artifacts?activate=true"),
    ("POST", "/admin/versions/{version}/activate"),
    ("POST", "/admin/refresh"),
    ("DELETE", "/admin/versions/{version}"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_CALLS)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN}],
    ids=["missing", "wrong", "no-scheme"],
)
def test_admin_refuses_bad_tokens_and_changes_nothing(
    http: httpx.Client,
    runtime: ServiceRuntime,
    plain_version: str,
    tmp_path: Path,
    method: str,
    path: str,
    headers: dict[str, str],
) -> None:
    before = _versions(runtime)
    directory, _ = _artifact_dir(tmp_path, seed=50)
    response = http.request(
        method, path.format(version=plain_version), headers=headers, content=_tar_gz(directory)
    )
    assert "Bearer" in _error(response, 401, "UNAUTHENTICATED")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert _versions(runtime) == before


@pytest.mark.parametrize(("method", "path"), ADMIN_CALLS)
def test_admin_disabled_without_token(empty: httpx.Client, method: str, path: str) -> None:
    response = empty.request(method, path.format(version="0" * 64), headers=AUTH)
    assert "ESANS_ADMIN_TOKEN" in _error(response, 403, "PERMISSION_DENIED")


def test_admin_lifecycle(http: httpx.Client, runtime: ServiceRuntime, tmp_path: Path) -> None:
    original = runtime.registry.active_version
    listed = http.get("/admin/versions", headers=AUTH).json()
    assert listed["active_version"] == original == listed["serving_version"]
    assert {v["version"] for v in listed["versions"]} == {v for v, _ in _versions(runtime)}
    for entry in listed["versions"]:  # ISO 8601 in UTC, as GetCodebookInfo's created_at
        assert dt.datetime.fromisoformat(entry["created_at"]).utcoffset() == dt.timedelta(0)

    # Upload without activation (zip), then with activation (tar.gz).
    directory, staged = _artifact_dir(tmp_path, seed=60)
    response = http.post("/admin/artifacts?activate=false", headers=AUTH, content=_zip(directory))
    assert response.status_code == 200, response.text
    assert response.json()["version"] == staged and runtime.registry.active_version == original
    directory, fresh = _artifact_dir(tmp_path, seed=61)
    response = http.post("/admin/artifacts?activate=true", headers=AUTH, content=_tar_gz(directory))
    assert response.json() == {"version": fresh, "activated": True, "active_version": fresh}
    assert http.get("/v1/codebook").json()["version"] == fresh

    # Roll back, refresh, delete the staged one; the active one cannot be deleted.
    assert original is not None
    response = http.post(f"/admin/versions/{original}/activate", headers=AUTH)
    assert response.json()["serving_version"] == original
    assert http.post("/admin/refresh", headers=AUTH).json()["changed"] is False
    assert http.delete(f"/admin/versions/{staged}", headers=AUTH).json() == {"deleted": staged}
    _error(http.delete(f"/admin/versions/{original}", headers=AUTH), 409, "FAILED_PRECONDITION")
    _error(http.delete(f"/admin/versions/{staged}", headers=AUTH), 404, "NOT_FOUND")
    _error(http.post(f"/admin/versions/{staged}/activate", headers=AUTH), 404, "NOT_FOUND")
    http.delete(f"/admin/versions/{fresh}", headers=AUTH)


def test_admin_multipart_upload(
    http: httpx.Client, runtime: ServiceRuntime, tmp_path: Path
) -> None:
    directory, version = _artifact_dir(tmp_path, seed=70)
    files = [("files", (p.name, p.read_bytes())) for p in sorted(directory.iterdir())]
    response = http.post("/admin/artifacts?activate=false", headers=AUTH, files=files)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == version and response.json()["activated"] is False
    http.delete(f"/admin/versions/{version}", headers=AUTH)


def test_admin_rejects_damaged_uploads(
    http: httpx.Client, runtime: ServiceRuntime, tmp_path: Path
) -> None:
    before = _versions(runtime)
    directory, _ = _artifact_dir(tmp_path, seed=80)
    index = directory / "index.npz"
    damaged = bytearray(index.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    index.write_bytes(bytes(damaged))
    response = http.post("/admin/artifacts?activate=true", headers=AUTH, content=_tar_gz(directory))
    assert "checksum" in _error(response, 409, "FAILED_PRECONDITION")
    for content in (b"", b"not an archive at all"):
        response = http.post("/admin/artifacts", headers=AUTH, content=content)
        _error(response, 422, "INVALID_ARGUMENT")
    empty_tar = io.BytesIO()
    with tarfile.open(fileobj=empty_tar, mode="w:gz"):
        pass
    response = http.post("/admin/artifacts", headers=AUTH, content=empty_tar.getvalue())
    assert "manifest.json" in _error(response, 422, "INVALID_ARGUMENT")
    assert _versions(runtime) == before


def test_upload_size_limit(redis_server: EmbeddedRedis, runtime: ServiceRuntime) -> None:
    small = _settings(redis_server.url, "http", admin_token=TOKEN, max_upload_bytes=1024)
    other = ServiceRuntime(small).start()
    try:
        url = f"http://127.0.0.1:{other.http_port}/admin/artifacts"
        with httpx.Client(timeout=10) as client:
            response = client.post(url, headers=AUTH, content=b"x" * 4096)
        _error(response, 413, "RESOURCE_EXHAUSTED")
    finally:
        other.stop(grace=0)


# ----------------------------------------------------------------------------- outages


def test_readyz_tells_the_truth_through_a_redis_outage(fresh_redis: EmbeddedRedis) -> None:
    with fresh_redis.client() as client:
        CodebookStore(client).publish(artifact_to_files(build_random_artifact(seed=1)))
    runtime = ServiceRuntime(_settings(fresh_redis.url, "esans")).start()
    try:
        base = f"http://127.0.0.1:{runtime.http_port}"
        with httpx.Client(base_url=base, timeout=10) as http:
            ids = runtime.registry.get(None).artifact.index.item_ids[:4].tolist()
            assert http.get("/readyz").json()["serving"] == "store"
            fresh_redis.kill()
            runtime.registry.refresh()
            ready = http.get("/readyz")
            assert ready.status_code == 200
            body = ready.json()
            assert body["serving"] == "last_good_snapshot" and body["stale"]
            assert body["redis"] == "unreachable"
            assert http.post("/v1/sample", json={"positive_ids": ids}).status_code == 200
            assert http.get("/v1/codebook").json()["stale"] is True
            assert "esans_codebook_stale 1.0" in http.get("/metrics").text

            runtime.service.begin_drain()
            draining = http.get("/readyz")
            assert draining.status_code == 503 and draining.json()["draining"]
    finally:
        runtime.stop(grace=0)


def test_admin_write_with_a_read_only_redis_user_is_403(redis_server: EmbeddedRedis) -> None:
    """A replica on the read-only ACL user (as deployed) says why an admin write cannot work."""
    with redis_server.client() as client:
        store = CodebookStore(client, namespace="http-ro")
        old = store.publish(artifact_to_files(build_random_artifact(seed=9)))
        store.publish(artifact_to_files(build_random_artifact(seed=10)))
        client.execute_command(
            "ACL", "SETUSER", "ro-test", "on", ">ro-secret", "~*", "&*", "+@read", "+subscribe",
            "+ping", "+client|setinfo",
        )  # fmt: skip
    url = redis_server.url.replace("redis://", "redis://ro-test:ro-secret@")
    runtime = ServiceRuntime(_settings(url, "http-ro", admin_token=TOKEN)).start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{runtime.http_port}", timeout=10) as http:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            before = http.get("/admin/versions", headers=auth).json()
            reply = http.delete(f"/admin/versions/{old}", headers=auth)
            message = _error(reply, 403, "PERMISSION_DENIED")
            assert "may not write" in message
            assert http.get("/admin/versions", headers=auth).json() == before
    finally:
        runtime.stop(grace=0)
        with redis_server.client() as client:
            client.execute_command("ACL", "DELUSER", "ro-test")


def test_body_format_errors_say_what_is_wrong(
    http: httpx.Client, ids: list[int], tmp_path: Path
) -> None:
    import json as json_module

    body = json_module.dumps({"positive_ids": ids})
    response = http.post("/v1/sample", content=body, headers={"content-type": "text/plain"})
    assert response.status_code == 415, response.text
    assert "application/json" in response.json()["error"]["message"]
    response = http.post(
        "/v1/sample",
        content=b'{"positive_ids": [1, 2',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("the body is not valid JSON") and "line 1" in message
    # A corrupt artifact upload is unprocessable content, not a server error.
    directory, _ = _artifact_dir(tmp_path, seed=77)
    payload = bytearray(_zip(directory))
    payload[len(payload) // 2] ^= 0xFF
    response = http.post("/admin/artifacts", headers=AUTH, content=bytes(payload))
    assert response.status_code == 422, response.text
