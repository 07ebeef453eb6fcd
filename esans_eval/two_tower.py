"""The two-tower retrieval model trained by every method (only the negatives differ).

item tower: v_i = normalize(E[i] + W_2 gelu(W_1 x_i)), with x_i the standardised
  concatenation of the item's text and metadata features and E an item-id embedding.
user tower: u = normalize(h + MLP(h)), h = mean of the item-tower outputs of the user's
  most recent ``history`` training items (padding excluded).
Both outputs are L2-normalised, d_k wide, so logits are cosines / tau.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn


class TwoTower(nn.Module):
    """features: (I, F) item features. Item ids are rows 0..I-1; id I is the padding."""

    def __init__(self, features: npt.NDArray[np.float32], dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        x = torch.as_tensor(features, dtype=torch.float32)
        x = (x - x.mean(dim=0)) / x.std(dim=0).clamp(min=1e-6)
        self.register_buffer("features", x)
        self.num_items = int(x.shape[0])
        self.item_ids = nn.Embedding(self.num_items, dim)
        nn.init.normal_(self.item_ids.weight, std=0.05)
        self.item_proj = nn.Sequential(
            nn.Linear(x.shape[1], hidden), nn.GELU(), nn.Linear(hidden, dim)
        )
        self.user_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def item_table(self) -> torch.Tensor:
        """(I, d) item-tower outputs of the whole catalogue."""
        feats = self.get_buffer("features")
        return F.normalize(self.item_ids.weight + self.item_proj(feats), dim=-1)

    def users(self, table: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """(B, d) user-tower outputs from ``history`` (B, N) item ids, ``num_items`` = pad."""
        valid = (history < self.num_items).unsqueeze(-1).to(table.dtype)
        rows = history.clamp(max=self.num_items - 1).long()
        h = (table[rows] * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)
        return F.normalize(h + self.user_mlp(h), dim=-1)
