"""The two-tower retrieval model trained by every method (only the negatives differ).

item tower: v_i = normalize(E[i] + W_2 gelu(W_1 x_i)), with x_i the item's text and metadata
  features, standardised and (when wider than :data:`TOWER_INPUTS`) projected onto their top
  principal components once per dataset (:func:`principal_features`), and E an item-id
  embedding.
user tower: u = normalize(h + MLP(h)), h = mean of the item-tower outputs of the user's
  most recent ``history`` training items (padding excluded).
Both outputs are L2-normalised, d_k wide, so logits are cosines / tau. A step only runs the
item tower on the items it needs, so a 70k-item catalogue costs what a 4k one does.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

TOWER_INPUTS = 64
"""Width of the item tower's feature input."""


def principal_features(features: npt.NDArray[np.float32], width: int) -> torch.Tensor:
    """(I, min(F, width)) standardised features, reduced by PCA when F > width."""
    x = torch.as_tensor(features, dtype=torch.float32)
    x = (x - x.mean(dim=0)) / x.std(dim=0).clamp(min=1e-6)
    if x.shape[1] > width:
        _, _, v = torch.linalg.svd(x[:: max(1, x.shape[0] // 20_000)], full_matrices=False)
        x = x @ v[:width].T
        x = x / x.std(dim=0).clamp(min=1e-6)
    return x.contiguous()


class TwoTower(nn.Module):
    """inputs: (I, F) item features as :func:`principal_features` returns them. Item ids
    are rows 0..I-1; id I is the padding."""

    def __init__(self, inputs: torch.Tensor, dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        x = inputs
        self.register_buffer("features", x, persistent=False)  # shared by runs, never trained
        self.num_items = int(x.shape[0])
        self.item_ids = nn.Embedding(self.num_items, dim)
        nn.init.normal_(self.item_ids.weight, std=0.05)
        self.item_proj = nn.Sequential(
            nn.Linear(x.shape[1], hidden), nn.GELU(), nn.Linear(hidden, dim)
        )
        self.user_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def items(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., d) item-tower outputs of ``ids`` (any shape, int64 in 0..I-1)."""
        feats = self.get_buffer("features")[ids]
        return F.normalize(self.item_ids(ids) + self.item_proj(feats), dim=-1)

    def item_table(self) -> torch.Tensor:
        """(I, d) item-tower outputs of the whole catalogue."""
        return self.items(torch.arange(self.num_items))

    def users(self, table: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """(B, d) user-tower outputs from ``history`` (B, N) item ids, ``num_items`` = pad;
        ``table`` is the (I, d) item table."""
        valid = history < self.num_items
        return self.users_from(table[history.clamp(max=self.num_items - 1).long()], valid)

    def users_from(self, history: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, d) user-tower outputs from embedded histories (B, N, d) and their (B, N) mask
        of real (not padding) entries."""
        weight = valid.unsqueeze(-1).to(history.dtype)
        h = (history * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)
        return F.normalize(h + self.user_mlp(h), dim=-1)
