"""esans_sampler.synthetic.random_artifact: the untrained artifact of the load test and the
service benchmark is a valid, publishable codebook."""

from __future__ import annotations

import numpy as np

from esans_sampler.artifact import artifact_from_files, artifact_to_files
from esans_sampler.synthetic import random_artifact


def test_random_artifact_is_valid_and_deterministic() -> None:
    artifact = random_artifact(1_000, 30, 4, 8, seed=3, first_id=500, metadata={"tag": "x"})
    ids = artifact.index.item_ids
    assert sorted(ids.tolist()) == list(range(500, 1_500))
    assert (artifact.index.cluster_sizes > 0).all() and artifact.codebook.num_primary == 30
    assert artifact.embeddings is not None and artifact.embeddings.shape == (1_000, 8)
    assert artifact.metadata == {"seed": 3, "tag": "x"}
    again = artifact_from_files(artifact_to_files(artifact))
    assert again.version == artifact.version
    assert random_artifact(
        1_000, 30, 4, 8, seed=3, first_id=500, metadata={"tag": "x"}
    ).version == (artifact.version)
    np.testing.assert_allclose(artifact.cluster_choice.sum(axis=1), 1.0, rtol=1e-6)
