"""The one use case of the service: sample negatives (and EDIS vectors) for a batch.

Both transports convert their request into a :class:`SampleRequest`, call
:meth:`SamplingService.sample` and convert the :class:`SampleResult` back. Everything a
caller can get wrong is checked here, with a message that says what to change.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from esans_sampler.cluster_choice import MAX_GAMMA, validate_gamma
from esans_sampler.contract.messages import CodebookInfo, SampledEmbeddings, SampleRequest
from esans_sampler.edis import MAX_ETA, MIN_LAMBDA, edis_from_rows
from esans_sampler.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidInputError,
    ResourceExhaustedError,
)
from esans_sampler.exclusions import Exclusions
from esans_sampler.kinds import MIXED, POPULARITY, SAMPLER_KINDS, UNIFORM
from esans_sampler.sampler import NegativeSample, NegativeSampler
from esans_sampler.stats import hard_coverage
from esans_service.leases import LeaseKeeper
from esans_service.loaded_codebook import LoadedCodebook
from esans_service.metrics import ServiceMetrics
from esans_service.registry import CodebookRegistry
from esans_service.settings import Settings, response_bytes

FloatArray = npt.NDArray[np.float32]

UINT64_MAX: Final = 2**64 - 1


@dataclass(frozen=True, eq=False)
class SampleResult:
    """The negatives drawn for one request, from exactly one codebook version."""

    codebook_version: str
    sampler: str
    sample: NegativeSample
    embeddings: SampledEmbeddings | None = None


@dataclass(frozen=True)
class _Resolved:
    """A request with defaults applied and every value checked."""

    ids: npt.NDArray[np.int64]
    m_c: int
    m_o: int
    m_h: int
    gamma: float | None
    eta: float
    hard_lambda: float


class SamplingService:
    """Validates requests, takes one codebook snapshot and samples from it.

    At most ``settings.max_concurrency`` samples run at once; more are refused at once
    with :class:`ResourceExhaustedError` (the caller backs off) rather than queued.
    Thread-safe.
    """

    def __init__(
        self,
        registry: CodebookRegistry,
        settings: Settings,
        metrics: ServiceMetrics | None = None,
        leases: LeaseKeeper | None = None,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self.metrics = metrics if metrics is not None else ServiceMetrics()
        self._leases = leases
        self._slots = threading.BoundedSemaphore(settings.max_concurrency)
        self._draining = threading.Event()
        self._thread_state = threading.local()

    @property
    def registry(self) -> CodebookRegistry:
        return self._registry

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def ready(self) -> bool:
        """Whether requests that pin no version can be served (and no drain has begun)."""
        return self._registry.ready and not self.draining

    @property
    def draining(self) -> bool:
        """Set by :meth:`begin_drain` at shutdown: readiness reports false from then on."""
        return self._draining.is_set()

    def begin_drain(self) -> None:
        self._draining.set()

    def sample(self, request: SampleRequest, deadline: float | None = None) -> SampleResult:
        """Negatives for ``request`` from one codebook snapshot.

        deadline: ``time.monotonic()`` value after which the caller no longer waits; the
        work is skipped (:class:`DeadlineExceededError`) once it has passed.

        Raises:
            InvalidInputError: a bad field (the message names it and the allowed range).
            NotFoundError: the pinned version does not exist.
            FailedPreconditionError: embeddings or popularity asked for but not available.
            UnavailableError: no codebook is loaded, or the store is down for a pinned one.
            ResourceExhaustedError: ``max_concurrency`` samples are already running.
            DeadlineExceededError: the deadline passed before the work started.
        """
        _check_deadline(deadline)
        resolved = self._resolve(request)
        with self.admitted():
            return self._sample(request, resolved, deadline)

    def sample_admitted(
        self, request: SampleRequest, deadline: float | None = None
    ) -> SampleResult:
        """:meth:`sample` for a caller that already holds a slot of :meth:`admitted` (the
        gRPC transport takes it before it yields to its event loop)."""
        _check_deadline(deadline)
        return self._sample(request, self._resolve(request), deadline)

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one of the ``max_concurrency`` sampling slots, or refuse at once.

        Raises:
            ResourceExhaustedError: every slot is taken.
        """
        if not self._slots.acquire(blocking=False):
            self.metrics.rejected.inc()
            raise ResourceExhaustedError(
                f"the server is running {self._settings.max_concurrency} sampling requests "
                "already (max_concurrency); retry with backoff or spread the load over replicas"
            )
        try:
            yield
        finally:
            self._slots.release()

    def _sample(self, request: SampleRequest, r: _Resolved, deadline: float | None) -> SampleResult:
        codebook = self._registry.get(request.codebook_version or None)  # one snapshot
        if request.codebook_version and self._leases is not None:
            self._leases.used(codebook.version)  # a pinned run: keep its version alive
        sampler = _sampler_of(codebook, request.sampler)
        table = codebook.artifact.embeddings
        if request.return_embeddings and table is None:
            raise FailedPreconditionError(
                f"codebook {codebook.version} has no embedding snapshot, so it cannot return "
                "embeddings or EDIS vectors; set return_embeddings=false or publish a codebook "
                "built with embeddings"
            )
        dim = int(table.shape[1]) if request.return_embeddings and table is not None else 0
        size = response_bytes(r.ids.shape[0], r.m_c, r.m_o, r.m_h, dim)
        if size > self._settings.max_response_bytes:
            raise InvalidInputError(
                f"the response would hold about {size / 2**20:.0f} MiB of tensors, over the "
                f"server's limit of {self._settings.max_response_bytes / 2**20:.0f} MiB; ask for "
                "a smaller batch, smaller m_c/m_o/m_h, or no embeddings"
            )
        exclude = None
        if request.exclude_ids is not None and request.exclude_offsets is not None:
            index = codebook.artifact.index
            exclude = Exclusions.build(
                index, r.ids.shape[0], request.exclude_ids, request.exclude_offsets
            )
        rng = self._unseeded_rng() if request.seed is None else np.random.default_rng(request.seed)
        _check_deadline(deadline)
        sample = sampler.sample(
            r.ids, rng, m_c=r.m_c, m_o=r.m_o, m_h=r.m_h, gamma=r.gamma, exclude=exclude
        )
        embeddings = None
        if request.return_embeddings and table is not None:
            _check_deadline(deadline)
            embeddings = _embeddings(table, sample, r.eta, r.hard_lambda)
        _count_served(self.metrics, sample, embeddings)
        return SampleResult(codebook.version, sampler.name, sample, embeddings)

    def _resolve(self, request: SampleRequest) -> _Resolved:
        s = self._settings
        ids = np.asarray(request.positive_ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise InvalidInputError(
                f"positive_ids must be a flat list of integer item ids, got shape {ids.shape} "
                f"and dtype {ids.dtype}"
            )
        if ids.dtype.kind == "u" and ids.size and ids.max() > np.iinfo(np.int64).max:
            raise InvalidInputError("positive_ids must fit in int64")
        if not 1 <= ids.shape[0] <= s.max_batch:
            raise InvalidInputError(
                f"positive_ids holds {ids.shape[0]} ids; send between 1 and {s.max_batch} "
                "(the server's max_batch) per request"
            )
        excluded = 0 if request.exclude_ids is None else np.asarray(request.exclude_ids).size
        if excluded > s.max_excluded_ids:
            raise InvalidInputError(
                f"exclude_ids holds {excluded} ids; at most {s.max_excluded_ids} per request "
                "(the server's max_excluded_ids)"
            )
        if request.sampler not in SAMPLER_KINDS:
            raise InvalidInputError(
                f"unknown sampler {request.sampler!r}; choose one of {', '.join(SAMPLER_KINDS)}"
            )
        if request.seed is not None and not 0 <= request.seed <= UINT64_MAX:
            raise InvalidInputError(f"seed must lie in [0, 2**64 - 1], got {request.seed}")
        gamma = request.gamma
        if gamma is not None:
            gamma = validate_gamma(_real("gamma", gamma, f"a number in [0, {MAX_GAMMA:g}]"))
        eta = _real("eta", s.default_eta if request.eta is None else request.eta, "finite >= 0")
        if not 0 <= eta <= MAX_ETA:
            raise InvalidInputError(f"eta must be a finite number in [0, {MAX_ETA:g}], got {eta}")
        lam = request.hard_lambda
        lam = _real("hard_lambda", s.default_hard_lambda if lam is None else lam, "finite < 1")
        if not MIN_LAMBDA <= lam < 1:
            raise InvalidInputError(
                f"hard_lambda must be a finite number in [{MIN_LAMBDA:g}, 1), got {lam} (1 would "
                "put every virtual hard negative on its positive)"
            )
        return _Resolved(
            ids=ids.astype(np.int64, copy=False),
            m_c=_size("m_c", request.m_c, s.default_m_c, 1, s.max_m_c),
            m_o=_size("m_o", request.m_o, s.default_m_o, 1, s.max_m_o),
            m_h=_size("m_h", request.m_h, s.default_m_h, 0, s.max_m_h),
            gamma=gamma,
            eta=eta,
            hard_lambda=lam,
        )

    def _unseeded_rng(self) -> np.random.Generator:
        """This thread's generator, seeded once from OS entropy: a request without a seed
        needs fresh randomness, not a generator of its own (building one costs ~15 us)."""
        rng: np.random.Generator | None = getattr(self._thread_state, "rng", None)
        if rng is None:
            rng = self._thread_state.rng = np.random.default_rng()
        return rng

    def codebook_info(self, version: str | None = None) -> CodebookInfo:
        """Facts about the active (None or "") or a pinned loaded-or-stored ``version``."""
        codebook = self._registry.get(version or None)
        artifact = codebook.artifact
        table = artifact.embeddings
        created_at = artifact.metadata.get("created_at")
        coverage = hard_coverage(artifact.index.fine_sizes, self._settings.default_m_h)
        return CodebookInfo(
            version=codebook.version,
            active=codebook.version == self._registry.active_version,
            loaded_versions=self._registry.loaded_versions(),
            num_items=artifact.num_items,
            num_primary=artifact.index.num_primary,
            num_secondary=artifact.index.num_secondary,
            embedding_dim=0 if table is None else int(table.shape[1]),
            modalities=list(artifact.codebook.modality_names),
            created_at=created_at if isinstance(created_at, str) else "",
            metadata=artifact.metadata,
            stale=self._registry.stale,
            secondary_quantisation=artifact.codebook.secondary_mode,
            hard_candidate_share=coverage.share_with_m_h,
            hard_candidate_m_h=coverage.m_h,
        )


def _count_served(
    metrics: ServiceMetrics, sample: NegativeSample, embeddings: SampledEmbeddings | None
) -> None:
    served, kind = metrics.negatives, sample.sampler
    hard = int(sample.hard_counts.sum())
    metrics.child(metrics.hard_slots, kind).inc(sample.hard_ids.size)
    metrics.child(served, kind, "simple").inc(sample.simple_ids.size)
    metrics.child(served, kind, "hard").inc(hard)
    if embeddings is not None:
        virtual = math.prod(embeddings.virtual_simple.shape[:-1])
        metrics.child(served, kind, "virtual_simple").inc(virtual)
        metrics.child(served, kind, "virtual_hard").inc(hard)


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceededError(
            "the request's deadline passed before sampling started; nothing was computed "
            "(allow a longer deadline or send smaller batches)"
        )


def _size(name: str, value: int | None, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidInputError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise InvalidInputError(
            f"{name}={value} is out of range; use an integer in [{low}, {high}] (the server's "
            f"max_{name} is {high})"
        )
    return int(value)


def _real(name: str, value: float, allowed: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be {allowed}, got {value!r}") from exc
    if not math.isfinite(number):
        raise InvalidInputError(
            f"{name} must be {allowed}, got {value!r} (NaN and inf are refused)"
        )
    return number


def _sampler_of(codebook: LoadedCodebook, kind: str) -> NegativeSampler:
    if kind == UNIFORM:
        return codebook.uniform
    if kind == MIXED:
        return codebook.mixed
    if kind == POPULARITY:
        if codebook.popularity is None:
            raise FailedPreconditionError(
                f"codebook {codebook.version} has no item popularity counts, so the popularity "
                "sampler is unavailable; choose another sampler or publish a codebook built "
                "with `esans build --popularity COUNTS.npy`"
            )
        return codebook.popularity
    return codebook.esans


def _embeddings(
    table: FloatArray, sample: NegativeSample, eta: float, hard_lambda: float
) -> SampledEmbeddings:
    """Gather the snapshot rows of the sample (once) and interpolate them (EDIS, eq. 11-13)."""
    edis = edis_from_rows(
        table, sample.positive_rows, sample.simple_rows, sample.hard_rows, eta, hard_lambda
    )
    return SampledEmbeddings(
        positive=edis.positive,
        simple=edis.simple,
        hard=edis.hard,
        virtual_simple=edis.virtual_simple,
        simple_weights=edis.simple_weights,
        virtual_hard=edis.virtual_hard,
        eta=eta,
        hard_lambda=hard_lambda,
    )
