"""Trainer-side losses where every row of a batch scores against every negative the batch
drew: the paper's protocol (appendix C) and the service's product default.

Sharing makes the rows' draws far more negatives per row for the same service call, but a
row now also sees what was drawn for other positives, some of which are its own positive or
sit in its fine cell (likely false negatives, spec §5). Those are masked per row, from the
fine cells the response carries (``simple_secondary`` / ``hard_secondary``): the trainer
needs no copy of the codebook. EDIS virtual negatives are shared unmasked (they are no item).

* :func:`shared_esans_loss`: ESANS as published: simple + hard + virtual negatives of the
  whole batch, no log-q correction.
* :func:`batch_softmax_loss`: the product default: in-batch softmax with log-q correction
  (the batch's positives as negatives of every row, TFRS-style) plus the ESANS hard
  negatives and their EDIS virtual twins, uncorrected.

Per-positive ESANS (each row sees only its own draws) is :func:`esans_sampler.trainer.esans_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

from esans_sampler.client import SampleResponse
from esans_sampler.errors import EsansError, InvalidInputError
from esans_sampler.exclusions import checked_csr, exclusion_mask
from esans_sampler.kinds import ESANS
from esans_sampler.loss import info_nce_loss
from esans_sampler.torch_ops import hard_interpolation, simple_interpolation
from esans_sampler.trainer import ItemEmbedder

__all__ = ["FineCells", "batch_softmax_loss", "fine_cells", "shared_esans_loss"]

IntArray = npt.NDArray[np.int64]
_NOT_DRAWN = -1  # fine-cell key of a column that was not drawn by ESANS (never masked by cell)
_EVERYONE = -1  # owner of a column every row sees


@dataclass(frozen=True, eq=False)
class FineCells:
    """Fine-cell keys of a response's items: positive (B,), simple (B, m_c, m_o), hard
    (B, m_h) int64; -1 on padded hard slots (a key no item has)."""

    positive: npt.NDArray[np.int64]
    simple: npt.NDArray[np.int64]
    hard: npt.NDArray[np.int64]


def fine_cells(response: SampleResponse) -> FineCells:
    """The fine cells of a response's positives and negatives, as one int64 key per item
    (primary * 2**32 + secondary; equal keys = same cell).

    Raises :class:`EsansError` when the server sent no secondary codes (a server older than
    ``simple_secondary`` / ``hard_secondary``) and :class:`InvalidInputError` for a baseline's
    response, whose draws have no cells.
    """
    if response.simple_secondary is None or response.hard_secondary is None:
        raise EsansError(
            "this response carries no secondary codes of its negatives: the server predates "
            "simple_secondary / hard_secondary; upgrade it to mask fine cells in the trainer"
        )
    if response.sampler != ESANS:
        raise InvalidInputError(
            f"only ESANS draws have fine cells; this response is from {response.sampler!r}"
        )

    def key(primary: npt.ArrayLike, secondary: npt.ArrayLike) -> npt.NDArray[np.int64]:
        p = np.asarray(primary, dtype=np.int64)
        s = np.asarray(secondary, dtype=np.int64)
        keys: npt.NDArray[np.int64] = np.where(s < 0, -1, (p << 32) + s)
        return keys

    batch = response.hard_ids.shape[0]
    return FineCells(
        positive=key(response.positive_primary, response.positive_secondary),
        simple=key(response.simple_clusters[:, :, None], response.simple_secondary),
        hard=key(response.positive_primary.reshape(batch, 1), response.hard_secondary),
    )


@dataclass
class _Columns:
    """The shared negatives being gathered: embeddings, and per column its item id (-1 for
    virtual ones), fine-cell key, owning row (-1: every row's) and log-q bias."""

    embeddings: list[torch.Tensor] = field(default_factory=list)
    ids: list[IntArray] = field(default_factory=list)
    cells: list[IntArray] = field(default_factory=list)
    owners: list[IntArray] = field(default_factory=list)
    bias: list[npt.NDArray[np.float64]] = field(default_factory=list)

    def add(
        self,
        embeddings: torch.Tensor,
        ids: IntArray,
        cells: IntArray | None = None,
        owners: IntArray | None = None,
        bias: npt.NDArray[np.float64] | None = None,
    ) -> None:
        n = embeddings.shape[0]
        self.embeddings.append(embeddings)
        self.ids.append(ids)
        self.cells.append(np.full(n, _NOT_DRAWN, np.int64) if cells is None else cells)
        self.owners.append(np.full(n, _EVERYONE, np.int64) if owners is None else owners)
        self.bias.append(np.zeros(n) if bias is None else bias)

    def mask(
        self,
        positive_ids: IntArray,
        positive_cells: IntArray,
        exclude: tuple[IntArray, IntArray] | None,
        shared: bool,
    ) -> npt.NDArray[np.bool_]:
        """(B, N) True where row b must not see column j: its own positive, an item of its
        fine cell drawn by ESANS, one of its exclusions; and, unless ``shared``, another
        row's draw."""
        ids, cells, owners = (np.concatenate(x) for x in (self.ids, self.cells, self.owners))
        real = ids >= 0
        mask: npt.NDArray[np.bool_] = (positive_ids[:, None] == ids[None, :]) & real
        mask |= (positive_cells[:, None] == cells[None, :]) & (cells != _NOT_DRAWN)
        if exclude is not None:
            mask[:, real] |= exclusion_mask(exclude[0], exclude[1], ids[real])
        if not shared:
            mask |= (owners[None, :] != _EVERYONE) & (
                owners[None, :] != np.arange(len(positive_ids))[:, None]
            )
        return mask


def shared_esans_loss(
    user_embeddings: torch.Tensor,
    positive_embeddings: torch.Tensor,
    positive_ids: npt.ArrayLike,
    response: SampleResponse,
    embed_items: ItemEmbedder,
    temperature: float = 0.05,
    eta: float = 0.6,
    hard_lambda: float = 0.1,
    use_edis: bool = True,
    exclude: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
) -> torch.Tensor:
    """InfoNCE (eq. 14) of users (B, d) against their positives (B, d) and ALL the batch's
    ESANS negatives (simple, hard and, with ``use_edis``, virtual), as the paper trains.

    ``positive_ids`` (B,) are the ids the request sent. Row b never sees its own positive
    nor a drawn item of its fine cell; ``exclude`` = (ids, offsets), the request's per-row
    exclusions in CSR form, also hides those items of row b drawn for other rows.
    """
    ids, cells, batch = _checked(positive_embeddings, positive_ids, response)
    device = positive_embeddings.device
    columns = _Columns()
    simple_ids = np.asarray(response.simple_ids, dtype=np.int64)
    simple = embed_items(torch.from_numpy(simple_ids.copy()).to(device))  # (B, m_c, m_o, d)
    columns.add(simple.reshape(-1, simple.shape[-1]), simple_ids.ravel(), cells.simple.ravel())
    hard, owners = _add_hard(columns, response, cells, embed_items, device)
    if use_edis:
        virtual, _ = simple_interpolation(simple, eta)  # eq. 11-12: (B, m_c, T, d)
        per_row = virtual.shape[1] * virtual.shape[2]
        columns.add(
            virtual.reshape(-1, virtual.shape[-1]),
            np.full(batch * per_row, -1, np.int64),
            owners=np.repeat(np.arange(batch, dtype=np.int64), per_row),
        )
        _add_virtual_hard(columns, positive_embeddings, hard, owners, hard_lambda)
    mask = columns.mask(ids, cells.positive, _csr(exclude, batch), shared=True)
    return info_nce_loss(
        user_embeddings,
        positive_embeddings,
        torch.cat(columns.embeddings),
        temperature=temperature,
        negative_mask=torch.from_numpy(mask).to(device),
    )


def batch_softmax_loss(
    user_embeddings: torch.Tensor,
    positive_embeddings: torch.Tensor,
    positive_ids: npt.ArrayLike,
    response: SampleResponse,
    embed_items: ItemEmbedder,
    positive_log_frequency: npt.ArrayLike,
    temperature: float = 0.05,
    hard_lambda: float = 0.1,
    use_edis: bool = True,
    share_hard: bool = True,
    exclude: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
) -> torch.Tensor:
    """The product default: in-batch softmax with log-q correction plus the response's ESANS
    hard negatives (and, with ``use_edis``, their EDIS virtual twins, eq. 13).

    The batch's positives are every row's negatives; each such logit and each row's positive
    logit lose log(B p_j), ``positive_log_frequency`` (B,) being log p_j, the frequency of
    each positive among the training targets (the trainer's estimate, e.g. counts / total, as
    TFRS's candidate sampling probability). Hard negatives ride along uncorrected; with
    ``share_hard`` every row sees every row's (as chosen on Complete Journey), otherwise only
    its own (as chosen on MovieLens-1M). Masks as in :func:`shared_esans_loss`; the simple
    negatives of the response are not used (ask for m_c = m_o = 1 to keep calls small).
    """
    ids, cells, batch = _checked(positive_embeddings, positive_ids, response)
    log_frequency = np.asarray(positive_log_frequency, dtype=np.float64)
    if log_frequency.shape != (batch,) or not np.isfinite(log_frequency).all():
        raise InvalidInputError(
            f"positive_log_frequency must be ({batch},) finite log frequencies, "
            f"got shape {log_frequency.shape}"
        )
    device = positive_embeddings.device
    columns = _Columns()
    hard, owners = _add_hard(columns, response, cells, embed_items, device)
    if use_edis:
        _add_virtual_hard(columns, positive_embeddings, hard, owners, hard_lambda)
    correction = math.log(max(batch, 1)) + log_frequency
    columns.add(positive_embeddings, ids, bias=correction)
    mask = columns.mask(ids, cells.positive, _csr(exclude, batch), shared=share_hard)
    dtype = user_embeddings.dtype
    return info_nce_loss(
        user_embeddings,
        positive_embeddings,
        torch.cat(columns.embeddings),
        temperature=temperature,
        negative_log_q=torch.from_numpy(np.concatenate(columns.bias)).to(device, dtype),
        negative_mask=torch.from_numpy(mask).to(device),
        positive_log_q=torch.from_numpy(correction).to(device, dtype),
    )


def _checked(
    positive_embeddings: torch.Tensor, positive_ids: npt.ArrayLike, response: SampleResponse
) -> tuple[IntArray, FineCells, int]:
    ids = np.asarray(positive_ids, dtype=np.int64)
    batch = response.hard_ids.shape[0]
    if batch == 0:
        raise InvalidInputError("an empty batch has no loss")
    if ids.shape != (batch,) or positive_embeddings.shape[0] != batch:
        raise InvalidInputError(
            f"positive_ids {ids.shape} and positive_embeddings "
            f"{tuple(positive_embeddings.shape)} must have the response's {batch} rows"
        )
    return ids, fine_cells(response), batch


def _add_hard(
    columns: _Columns,
    response: SampleResponse,
    cells: FineCells,
    embed_items: ItemEmbedder,
    device: torch.device,
) -> tuple[torch.Tensor, IntArray]:
    """Add the real hard negatives (row by row) as columns; their embeddings and rows."""
    valid = response.hard_valid
    ids = np.asarray(response.hard_ids, dtype=np.int64)[valid]
    hard = embed_items(torch.from_numpy(ids).to(device))
    owners = np.nonzero(valid)[0].astype(np.int64)
    columns.add(hard, ids, cells.hard[valid], owners)
    return hard, owners


def _add_virtual_hard(
    columns: _Columns,
    positive_embeddings: torch.Tensor,
    hard: torch.Tensor,
    owners: IntArray,
    hard_lambda: float,
) -> None:
    """EDIS's virtual twin of each hard negative, between it and its row's positive (eq. 13)."""
    anchors = positive_embeddings[torch.from_numpy(owners).to(positive_embeddings.device)]
    virtual = hard_interpolation(anchors, hard.unsqueeze(1), hard_lambda).squeeze(1)
    columns.add(virtual, np.full(len(owners), -1, np.int64), owners=owners)


def _csr(
    exclude: tuple[npt.ArrayLike, npt.ArrayLike] | None, batch: int
) -> tuple[IntArray, IntArray] | None:
    if exclude is None:
        return None
    ids, offsets = checked_csr(batch, *exclude)
    return ids.astype(np.int64), offsets
