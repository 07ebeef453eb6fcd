"""Artifact uploads: archives unpack by base name; links, duplicates and bombs are refused."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from esans_sampler.errors import InvalidInputError, PayloadTooLargeError
from esans_service.uploads import unpack_upload

LIMIT = 1 << 20


def _tar(members: list[tuple[str, bytes]], links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            archive.addfile(info)
    return buffer.getvalue()


def test_paths_reduce_to_artifact_file_names() -> None:
    body = _tar([("../../x/manifest.json", b"{}"), ("/abs/index.npz", b"i"), ("notes.txt", b"n")])
    assert unpack_upload(body, "application/gzip", LIMIT) == {
        "manifest.json": b"{}",
        "index.npz": b"i",
    }


def test_zip() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a/manifest.json", b"{}")
    assert unpack_upload(buffer.getvalue(), "application/zip", LIMIT) == {"manifest.json": b"{}"}


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (_tar([("manifest.json", b"{}")], links=("index.npz",)), "not a regular file"),
        (_tar([("a/manifest.json", b"1"), ("b/manifest.json", b"2")]), "twice"),
        (_tar([("index.npz", b"i")]), "no manifest.json"),
        (b"\x1f\x8b garbage", "neither a zip nor"),
    ],
)
def test_bad_archives(body: bytes, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        unpack_upload(body, "application/octet-stream", LIMIT)


def test_unpacked_size_is_bounded() -> None:
    body = _tar([("manifest.json", b"\0" * (LIMIT + 1))])  # compresses to almost nothing
    assert len(body) < LIMIT // 100
    with pytest.raises(PayloadTooLargeError):
        unpack_upload(body, "application/gzip", LIMIT)
