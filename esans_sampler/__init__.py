"""ESANS negative sampling: MSAC codebooks, semantic-aware sampling and EDIS."""

from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.codebook import Codebook
from esans_sampler.errors import EsansError

__all__ = ["ClusterIndex", "Codebook", "EsansError"]
__version__ = "0.1.0"
