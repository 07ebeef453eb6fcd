"""Artifact uploads: the files of a codebook artifact out of a zip, a tar(.gz) or multipart.

Nothing is written to disk: members are read into memory by their base name, so archive
paths (``../``, absolute) cannot escape anywhere, and the declared sizes are summed against
a limit before anything is read.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import logging
import tarfile
import zipfile
from pathlib import PurePosixPath

from esans_sampler.artifact import DATA_FILES, MANIFEST
from esans_sampler.catalogue_delta import DELTA_ARRAYS, DELTA_MANIFEST
from esans_sampler.errors import InvalidInputError, PayloadTooLargeError

logger = logging.getLogger(__name__)

ARTIFACT_FILES = frozenset((MANIFEST, *DATA_FILES))
DELTA_FILES = frozenset((DELTA_MANIFEST, DELTA_ARRAYS))


def unpack_upload(body: bytes, content_type: str, limit: int) -> dict[str, bytes]:
    """Artifact (or catalogue delta) files, name -> bytes, of an upload: multipart, zip, tar
    or tar.gz.

    Only the artifact's own file names are taken (directories inside the archive are
    ignored, so ``tar czf a.tgz artifact/`` works); links, devices and files past ``limit``
    bytes in total are refused.
    """
    if not body:
        raise InvalidInputError("the upload is empty; send a tar.gz or zip of the artifact")
    if content_type.lower().startswith("multipart/form-data"):
        members = _multipart_members(body, content_type)
    elif body[:4] == b"PK\x03\x04":
        members = _zip_members(body, limit)
    else:
        members = _tar_members(body, limit)
    files: dict[str, bytes] = {}
    for path, data in members:
        name = PurePosixPath(path).name
        if name not in ARTIFACT_FILES and name not in DELTA_FILES:
            logger.info("upload: ignoring %s (not an artifact file)", path)
            continue
        if name in files:
            raise InvalidInputError(f"the upload holds {name} twice")
        files[name] = data
    if MANIFEST not in files and DELTA_MANIFEST not in files:
        raise InvalidInputError(
            f"the upload has no {MANIFEST} (nor {DELTA_MANIFEST}); send the directory written "
            "by `esans build` (or by `esans assign`)"
        )
    return files


def _zip_members(body: bytes, limit: int) -> list[tuple[str, bytes]]:
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            infos = [info for info in archive.infolist() if not info.is_dir()]
            if sum(info.file_size for info in infos) > limit:
                raise PayloadTooLargeError(f"unpacked upload exceeds max_upload_bytes={limit}")
            return [(info.filename, archive.read(info)) for info in infos]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise InvalidInputError(f"the upload is not a readable zip archive ({exc})") from exc


def _tar_members(body: bytes, limit: int) -> list[tuple[str, bytes]]:
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as archive:
            members = []
            total = 0
            for member in archive:
                if member.isdir():
                    continue
                if not member.isfile():
                    raise InvalidInputError(
                        f"the upload holds {member.name}, which is not a regular file"
                    )
                total += member.size
                if total > limit:
                    raise PayloadTooLargeError(f"unpacked upload exceeds max_upload_bytes={limit}")
                handle = archive.extractfile(member)
                if handle is None:
                    raise InvalidInputError(f"cannot read {member.name} from the upload")
                members.append((member.name, handle.read()))
            return members
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InvalidInputError(
            f"the upload is neither a zip nor a (gzipped) tar archive ({exc}); send "
            "`tar czf artifact.tgz ARTIFACT_DIR` or a zip"
        ) from exc


def _multipart_members(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise InvalidInputError("the multipart upload could not be parsed")
    members = []
    for part in message.iter_parts():
        name = part.get_filename() or part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(payload, bytes):
            raise InvalidInputError("every multipart part needs a file name and content")
        members.append((name, payload))
    return members
