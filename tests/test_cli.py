"""The `esans` command line, run in-process through `main(argv)` on small real inputs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from esans_cli import main
from esans_sampler.artifact import load_artifact
from esans_sampler.catalogue import write_npy_catalogue
from esans_sampler.synthetic import make_planted_catalogue
from esans_service.embedded_redis import EmbeddedRedis

SMALL = ["--kp", "6", "--ks", "3", "--dm", "16", "--epochs", "1", "--seed", "1", "--quiet"]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    planted = make_planted_catalogue(600, {"image": 24, "text": 12}, num_clusters=6, seed=3)
    directory = tmp_path_factory.mktemp("catalogue")
    paths = write_npy_catalogue(directory, planted.item_ids, planted.features)
    np.save(directory / "counts.npy", np.arange(600, dtype=np.int64))
    paths["counts"] = directory / "counts.npy"
    return paths


def _build_args(paths: dict[str, Path], out: Path) -> list[str]:
    return [
        "build",
        "--ids", str(paths["ids"]),
        "--modality", f"image={paths['image']}",
        "--modality", f"text={paths['text']}",
        "--out", str(out),
    ]  # fmt: skip


def test_build_then_inspect_writes_every_items_codes(
    catalogue: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "artifact"
    argv = [*_build_args(catalogue, out), *SMALL, "--popularity", str(catalogue["counts"])]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "L_SQ" in printed and "primary used" in printed and "wrote" in printed
    artifact = load_artifact(out)
    assert artifact.popularity is not None and artifact.num_items == 600
    assert artifact.metadata["parameters"]["num_primary"] == 6
    assert set(artifact.metadata["catalogue"]["sha256"]) == {
        str(catalogue[k]) for k in ("ids", "image", "text", "counts")
    }

    codes = tmp_path / "codes.csv"
    assert main(["inspect", str(out), "--codes", str(codes)]) == 0
    assert "effective clusters" in capsys.readouterr().out
    with codes.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 600
    by_id = {int(r["item_id"]): (int(r["primary"]), int(r["secondary"])) for r in rows}
    index = artifact.index
    for item_id, p, s in zip(index.item_ids[:50], index.primary, index.secondary, strict=False):
        assert by_id[int(item_id)] == (int(p), int(s))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["build", "--out", "x"], "no catalogue"),
        (["build", "--ids", "missing.npy", "--modality", "a=missing.npy", "--out", "x"], "missing"),
        (["build", "--parquet", "p.parquet", "--ids", "i.npy", "--out", "x"], "either --parquet"),
        (["inspect", "does/not/exist"], "exist"),
    ],
)
def test_usage_and_input_errors_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err.lower()


def test_build_refuses_counts_of_the_wrong_length(
    catalogue: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "counts.npy"
    np.save(bad, np.ones(5))
    argv = [*_build_args(catalogue, tmp_path / "a"), *SMALL, "--popularity", str(bad)]
    assert main(argv) == 2
    assert "popularity counts have shape (5,)" in capsys.readouterr().err


def test_build_refuses_to_overwrite_without_the_flag(
    catalogue: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "artifact"
    assert main([*_build_args(catalogue, out), *SMALL]) == 0
    capsys.readouterr()
    assert main([*_build_args(catalogue, out), *SMALL]) == 2
    assert "overwrite" in capsys.readouterr().err


def test_publish_refuses_when_no_redis_is_there_to_reach(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    redis_server: EmbeddedRedis,
) -> None:
    """No ESANS_REDIS_URL and no embedded Redis serving the data directory: publishing would
    go to a throwaway Redis no server reads, so it refuses and names what to set."""
    from conftest import build_random_artifact

    from esans_sampler.artifact import save_artifact

    monkeypatch.delenv("ESANS_REDIS_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    save_artifact(build_random_artifact(seed=1, num_items=50, dim=4), tmp_path / "art")
    assert main(["publish", "art"]) == 2
    err = capsys.readouterr().err
    assert "no Redis to publish to" in err and "ESANS_REDIS_URL" in err
    assert str(tmp_path / "var" / "redis") in err
    assert not (tmp_path / "var").exists()  # nothing started, nothing written
    # With a Redis to reach, the publish says which one it wrote to.
    assert main(["publish", "art", "--redis-url", redis_server.url, "--namespace", "pub"]) == 0
    out = capsys.readouterr().out
    port = redis_server.url.rsplit(":", 1)[1].split("/")[0]
    assert "published and activated version" in out and f"127.0.0.1:{port}" in out


@pytest.mark.parametrize("which", ["grpc", "http"])
def test_serve_on_a_taken_port_says_so_in_one_line(
    which: str, redis_server: EmbeddedRedis, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = {"grpc": "0", "http": "0", which: str(port)}
        code = main(
            ["serve", "--redis-url", redis_server.url,
             "--grpc-port", ports["grpc"], "--http-port", ports["http"]]
        )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    last = err.splitlines()[-1]
    assert last.startswith("esans serve: error:") and str(port) in last
    assert f"ESANS_{which.upper()}_PORT" in last and f"--{which}-port" in last
    assert "Traceback" not in err


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"esans {version('esans-sampler')}"


def test_help_documents_every_flag_and_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    from esans_service.settings import Settings

    for command in ("serve", "demo", "publish", "build", "inspect"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        options = text.split("options:", 1)[1].split("settings (environment", 1)[0]
        blocks = [b for b in options.split("\n  -") if b.strip()]
        for block in blocks:  # every flag has a help text after its name
            assert len(block.split()) > 2 or block.strip().startswith("h, --help"), (command, block)
        if command == "serve":
            for name in Settings.model_fields:
                assert f"ESANS_{name.upper()} (default" in text


def test_publish_of_a_corrupt_directory_fails_even_when_its_version_is_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_server: EmbeddedRedis
) -> None:
    from conftest import build_random_artifact

    from esans_sampler.artifact import CODEBOOK_FILE, save_artifact

    save_artifact(build_random_artifact(seed=2, num_items=50, dim=4), tmp_path / "art")
    args = ["publish", str(tmp_path / "art"), "--redis-url", redis_server.url]
    assert main(args) == 0
    capsys.readouterr()
    damaged = tmp_path / "art" / CODEBOOK_FILE
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte
    damaged.write_bytes(bytes(data))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and CODEBOOK_FILE in err


def test_build_speaks_in_flags_and_refuses_an_existing_out_before_training(
    catalogue: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _build_args(catalogue, tmp_path / "art")
    assert main([*args, "--kp", "700", "--ks", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "lower --kp/--ks" in err and "num_primary" not in err
    assert main([*args, "--dm", "0", "--quiet"]) == 2
    assert "--dm must be a positive integer" in capsys.readouterr().err
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "keep.txt").write_text("mine")
    assert main([*args, "--kp", "6", "--ks", "4", "--epochs", "50"]) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite" in err and "overwrite=True" not in err
    assert "codebook init" not in err  # refused before any work
    assert (tmp_path / "art" / "keep.txt").read_text() == "mine"


def test_build_shows_progress_before_the_first_epoch(
    catalogue: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _build_args(catalogue, tmp_path / "art")
    assert main([*args, "--kp", "6", "--ks", "4", "--epochs", "1"]) == 0
    err = capsys.readouterr().err
    assert "codebook init: reading" in err and "primary k-means (K_p 6)" in err
    assert err.index("codebook init") < err.index("MSAC")


def test_versions_commands_drive_the_admin_api(
    redis_server: EmbeddedRedis,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from conftest import build_random_artifact

    from esans_sampler.artifact import artifact_to_files
    from esans_service.app import ServiceRuntime
    from esans_service.harness import local_settings
    from esans_service.leases import LeaseKeeper
    from esans_service.store import CodebookStore

    token = "t" * 24
    with redis_server.client() as client:
        store = CodebookStore(client, namespace="versions-cli")
        old = store.publish(artifact_to_files(build_random_artifact(seed=5, num_items=60, dim=4)))
        new = store.publish(artifact_to_files(build_random_artifact(seed=6, num_items=60, dim=4)))
    settings = local_settings(redis_server.url, "versions-cli", admin_token=token)
    runtime = ServiceRuntime(settings).start()
    try:
        url = f"http://127.0.0.1:{runtime.http_port}"
        monkeypatch.setenv("ESANS_ADMIN_TOKEN", token)
        assert main(["versions", "--url", url, "list"]) == 0
        listing = capsys.readouterr().out
        assert f"* {new[:16]}" in listing and f"  {old[:16]}" in listing
        assert main(["versions", "--url", url, "activate", old[:16]]) == 0
        assert f"active version {old}" in capsys.readouterr().out
        # A training run's lease keeps a version until the delete is forced.
        with redis_server.client() as client:
            keeper = LeaseKeeper(client, "versions-cli", ttl_s=60)
            keeper.used(new)
            keeper.renew_due()
        assert main(["versions", "--url", url, "delete", new[:12]]) == 2
        assert "pinned by a training run" in capsys.readouterr().err
        assert main(["versions", "--url", url, "delete", "--force", new[:12]]) == 0
        assert f"deleted version {new}" in capsys.readouterr().out
        # The active version cannot be deleted; a wrong token and no server say so.
        assert main(["versions", "--url", url, "delete", old[:16]]) == 2
        assert "409" in capsys.readouterr().err
        assert main(["versions", "--url", url, "--token", "w" * 24, "list"]) == 2
        assert "401" in capsys.readouterr().err
    finally:
        runtime.stop(grace=0)
    assert main(["versions", "--url", url, "list"]) == 2
    assert "cannot reach the admin API" in capsys.readouterr().err
    monkeypatch.delenv("ESANS_ADMIN_TOKEN")
    assert main(["versions", "--url", url, "list"]) == 2
    assert "no admin token" in capsys.readouterr().err
