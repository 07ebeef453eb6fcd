"""Publishing a catalogue delta: base version from the store + delta = a new complete version,
written and activated with the same atomic protocol as a full publish."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from esans_sampler.artifact import artifact_from_files, artifact_to_files
from esans_sampler.catalogue_delta import apply_delta, delta_from_files
from esans_sampler.errors import FailedPreconditionError
from esans_service.store import CodebookStore


def publish_delta(
    store: CodebookStore,
    files: Mapping[str, bytes],
    activate: bool = True,
    allow_stale_base: bool = False,
) -> tuple[str, dict[str, Any]]:
    """Apply the delta ``files`` to its base version in ``store`` and publish the result;
    return the new version and the delta's drift report.

    A delta whose base is no longer the active version would drop whatever was published
    since (another delta, a rebuild): it is refused unless ``allow_stale_base``.

    Raises:
        ArtifactError: the delta is malformed, or does not fit its base.
        NotFoundError: the store no longer has the base version.
        FailedPreconditionError: the base is not the active version.
    """
    delta = delta_from_files(files)
    active = store.active_version()
    if not allow_stale_base and active is not None and active != delta.base_version:
        raise FailedPreconditionError(
            f"the delta was assigned against {delta.base_version[:16]}, but {active[:16]} is "
            "active now: publishing it would drop what changed since. Assign the new items "
            "against the active version's artifact, or publish with --allow-stale-base "
            "(?allow_stale_base=true) if that is what you want"
        )
    base = artifact_from_files(store.verify(store.resolve(delta.base_version)))
    updated = apply_delta(base, delta)
    return store.publish(artifact_to_files(updated), activate=activate), delta.drift
