"""Secondary codebooks with one set of K_s codewords per primary cluster (the default).

The paper quantises every item's residual (eq. 6) with one global codebook of K_s codewords.
Where the residuals are dominated by an offset that differs per primary cluster, those K_s
codewords quantise the offsets: each cluster collapses into one fine cell and no positive
gets hard negatives (measured in ``benchmarks/bench_fine_cells.py``). Here each primary
cluster p has its own codewords z_s[p] (K_s, M * d_m), fitted to the residuals of p's items.

Two steps bracket the joint training of ``msac.py``:

* :func:`init_per_cluster` seeds z_s[p] by k-means on the residuals of p's sampled items.
* :func:`refine_per_cluster` runs after the last epoch: for each cluster, Lloyd's k-means on
  the final residuals, started both from the trained codewords and from fresh k-means++
  seedings, keeps whichever quantises the cluster with the lower L_SQ, never a worse one.
  Adam moves every codeword by about the learning rate per step whatever its gradient's size,
  so where sub-clusters lie closer together than that the trained codewords drift off them
  (measured: fine-cell ARI 0.47 trained vs 0.93 refined on sub-clusters 12x weaker than
  their clusters); the refinement puts them back on the structure the maps learned.
"""

from __future__ import annotations

import torch

from esans_sampler.kmeans import kmeans, lloyd, potential


def init_per_cluster(
    r_s: torch.Tensor,
    primary: torch.Tensor,
    num_primary: int,
    num_secondary: int,
    num_iters: int,
    num_restarts: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """(K_p, K_s, D) codewords: k-means on the residuals ``r_s`` (n, D) of each cluster.

    A cluster with n < K_s sampled items gets one codeword per item; its spare codewords are
    copies of its residual mean (unused, as the nearest codeword wins ties by the lowest
    index, until re-seeding gives them a use). An unsampled cluster keeps zeros.
    """
    codewords = torch.zeros(num_primary, num_secondary, r_s.shape[1], dtype=r_s.dtype)
    for p in range(num_primary):
        members = r_s[primary == p]
        n = int(members.shape[0])
        if n == 0:
            continue
        k = min(num_secondary, n)
        z, _ = kmeans(members, k, num_iters, generator, num_restarts=num_restarts)
        codewords[p, :k] = z
        codewords[p, k:] = members.mean(dim=0)
    return codewords


def refine_per_cluster(
    codewords: torch.Tensor,
    r_s: torch.Tensor,
    primary: torch.Tensor,
    num_iters: int,
    num_restarts: int,
    generator: torch.Generator,
) -> int:
    """Refine ``codewords`` (K_p, K_s, D) in place on residuals ``r_s`` (n, D) of clusters
    ``primary`` (n,); returns how many clusters took the fresh k-means solution.

    ``r_s`` may be stored in lower precision; each cluster's rows are computed on in the
    codewords' dtype. Clusters with fewer sampled items than K_s are left as trained.
    """
    num_secondary = codewords.shape[1]
    replaced = 0
    with torch.no_grad():
        for p in torch.unique(primary).tolist():
            members = r_s[primary == p].to(codewords.dtype)
            if members.shape[0] < num_secondary:
                continue
            best, best_potential = lloyd(members, codewords[p], num_iters)
            fresh, _ = kmeans(
                members, num_secondary, num_iters, generator, num_restarts=num_restarts
            )
            if potential(members, fresh) < best_potential:
                best, replaced = fresh, replaced + 1
            codewords[p] = best
    return replaced
