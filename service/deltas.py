"""Publishing a catalogue delta: base version from the store + delta = a new complete version,
written and activated with the same atomic protocol as a full publish."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from esans_sampler.artifact import artifact_from_files, artifact_to_files
from esans_sampler.catalogue_delta import apply_delta, delta_from_files
from esans_service.store import CodebookStore


def publish_delta(
    store: CodebookStore, files: Mapping[str, bytes], activate: bool = True
) -> tuple[str, dict[str, Any]]:
    """Apply the delta ``files`` to its base version in ``store`` and publish the result;
    return the new version and the delta's drift report.

    Raises:
        ArtifactError: the delta is malformed, or does not fit its base.
        NotFoundError: the store no longer has the base version.
    """
    delta = delta_from_files(files)
    base = artifact_from_files(store.verify(store.resolve(delta.base_version)))
    updated = apply_delta(base, delta)
    return store.publish(artifact_to_files(updated), activate=activate), delta.drift
