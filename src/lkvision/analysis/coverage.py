"""Feature-map utilisation ("coverage") of the shift-add paths (SW paper §3.5, Fig. 4).

Setting (SW.md §1-2). One rep channel c of a Shiftwise layer owns ``nk = ceil(M/k)`` conv output maps
``X_j`` (j < nk), each of size ``Hin x Win = (H + 2e) x (W + 2e)`` (conv padding ``P = k-1``,
``e = P - k//2``). Block i of the strip has offset ``rp[i] = M//2 - i*k - P``. Per edge (one horizontal,
one vertical and one identity path) the shift-add op adds

* horizontal: ``X_j[h, w]`` into ``H_out[h-e, w+ph_j]``  (``ph_j = rp[block of j]``),
* vertical:   ``X_j[h, w]`` into ``V_out[h+pv_j, w-e]``,
* identity:   ``X_u[h, w]`` into ``S_out[h-e, w-e]`` for the one picked filter u,

each only when the target lies inside the H x W output. **Use count** ``U_j(h, w)`` = number of such
terms (over edges and the three paths) in which ``X_j[h, w]`` lands inside the output; it equals the
gradient of ``sum(H_out + V_out + S_out)`` with respect to X. **Utilisation** (the paper's "coverage" /
"utilization ratio") = share of conv-output elements with ``U > 0``:
``utilization = #{(j, h, w): U_j(h, w) > 0} / (nk * Hin * Win)``, averaged over rep channels.

"Without shuffle" (paper's "given order", the official analysis script's convention): every edge uses the
same order, horizontal blocks in descending filter order (block i holds filter nk-1-i), vertical in
ascending order, identity on filter 0 -- so more edges add nothing. "With shuffle": independent random
permutations per edge, direction and channel, and a random identity filter per edge (as the final op's
tables). The official script allocates (H+2P)^2 maps; we use the true (H+2e)^2 conv output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["block_offsets", "use_counts", "order_tables", "coverage", "coverage_curve", "coverage_from_tables"]


def block_offsets(M: int, k: int = 3) -> list[int]:
    """Offsets ``rp[i] = M//2 - i*k - (k-1)`` of the nk = ceil(M/k) blocks (:func:`lkvision.ops.shift_offsets`)."""
    from ..ops.shift_add import shift_offsets

    return shift_offsets(M, k)


def use_counts(
    h_offsets: torch.Tensor, v_offsets: torch.Tensor, identity: torch.Tensor, nk: int, H: int, W: int, e: int = 1
) -> torch.Tensor:
    """Use-count maps U of every conv-output element.

    ``h_offsets``/``v_offsets``: (R*nk, E) integer offsets ph/pv of filter ``c*nk + j`` on each edge (the
    layout of the op's ``pad_hv`` table, split into its two halves). ``identity``: (R, E) flat filter indices
    ``c*nk + u`` picked by the identity path. Returns (R, nk, H + 2e, W + 2e) int64.
    """
    F, E = h_offsets.shape
    if v_offsets.shape != (F, E) or F % nk:
        raise ValueError(f"h/v offsets must both be (R*nk, E); got {tuple(h_offsets.shape)}, "
                         f"{tuple(v_offsets.shape)} with nk={nk}")
    R = F // nk
    if identity.shape != (R, E):
        raise ValueError(f"identity must be (R, E) = ({R}, {E}), got {tuple(identity.shape)}")
    Hin, Win = H + 2 * e, W + 2 * e
    U = torch.zeros(F, Hin, Win, dtype=torch.int64)
    ph, pv = h_offsets.tolist(), v_offsets.tolist()
    for f in range(F):
        for ii in range(E):
            x0, x1 = max(-ph[f][ii], 0), min(W - ph[f][ii], Win)
            if x1 > x0:
                U[f, e:e + H, x0:x1] += 1
            y0, y1 = max(-pv[f][ii], 0), min(H - pv[f][ii], Hin)
            if y1 > y0:
                U[f, y0:y1, e:e + W] += 1
    for c, picks in enumerate(identity.tolist()):
        for u in picks:
            if not c * nk <= u < (c + 1) * nk:
                raise ValueError(f"identity pick {u} of channel {c} is outside its filters "
                                 f"[{c * nk}, {(c + 1) * nk})")
            U[u, e:e + H, e:e + W] += 1
    return U.view(R, nk, Hin, Win)


def order_tables(
    M: int, edges: int, shuffle: bool, k: int = 3, groups: int = 1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Offsets and identity picks for ``groups`` rep channels and ``edges`` edges: ``(h_offsets (G*nk, E),
    v_offsets (G*nk, E), identity (G, E))`` -- fixed order (see module doc) or random order."""
    if edges < 1 or groups < 1:
        raise ValueError(f"need edges >= 1 and groups >= 1, got {edges}, {groups}")
    rp = torch.tensor(block_offsets(M, k))
    nk = rp.numel()
    g = torch.Generator().manual_seed(seed)
    h = torch.empty(groups * nk, edges, dtype=torch.int64)
    v = torch.empty_like(h)
    ident = torch.empty(groups, edges, dtype=torch.int64)
    desc, asc = torch.arange(nk - 1, -1, -1), torch.arange(nk)
    for c in range(groups):
        for ii in range(edges):
            ph_blocks = torch.randperm(nk, generator=g) if shuffle else desc  # block i holds filter perm[i]
            pv_blocks = torch.randperm(nk, generator=g) if shuffle else asc
            # filter j sits in block inv[j] and gets offset rp[inv[j]]
            h[c * nk + ph_blocks, ii] = rp
            v[c * nk + pv_blocks, ii] = rp
            u = int(torch.randint(nk, (1,), generator=g)) if shuffle else 0
            ident[c, ii] = c * nk + u
    return h, v, ident


def coverage(
    M: int, H: int, W: int | None = None, edges: int = 1, shuffle: bool = True, k: int = 3, groups: int = 8,
    seed: int = 0,
) -> dict:
    """Utilisation of the conv outputs of an M-long SW strip on an H x W map with ``edges`` edges.

    Random orders are averaged over ``groups`` rep channels (independent draws). Returns
    ``dict(utilization, mean_use, per_filter (nk,), counts (groups, nk, Hin, Win))``.
    """
    W = H if W is None else W
    e = (k - 1) - k // 2
    h, v, ident = order_tables(M, edges, shuffle, k, groups if shuffle else 1, seed)
    nk = math.ceil(M / k)
    U = use_counts(h, v, ident, nk, H, W, e)
    used = (U > 0).double()
    return {"utilization": float(used.mean()), "mean_use": float(U.double().mean()),
            "per_filter": used.mean(dim=(0, 2, 3)), "counts": U}


def coverage_curve(
    Ms: Sequence[int] = (51, 49, 47, 13),
    sizes: Sequence[int] | None = (56, 28, 14, 7),
    edges: Sequence[int] = (1, 2, 4, 8),
    k: int = 3,
    groups: int = 8,
    seed: int = 0,
) -> list[dict]:
    """Fig. 4(b): rows ``M, H, shuffle, edges, utilization, mean_use`` for every M (with its feature-map
    size; SW-tiny's stage sizes at 224 by default), edge count, with and without shuffled order."""
    sizes = list(sizes) if sizes is not None else [56] * len(Ms)
    if len(sizes) != len(Ms):
        raise ValueError(f"give one feature-map size per M: {len(Ms)} Ms, {len(sizes)} sizes")
    rows = []
    for M, H in zip(Ms, sizes):
        for sh in (False, True):
            for E in edges:
                c = coverage(M, H, H, E, sh, k, groups, seed)
                rows.append({"M": M, "H": H, "shuffle": sh, "edges": E, "utilization": c["utilization"],
                             "mean_use": c["mean_use"]})
    return rows


def coverage_from_tables(pad_hv: torch.Tensor, idx_identit: torch.Tensor, H: int, W: int | None = None,
                         k: int = 3) -> dict:
    """Utilisation of a real Shiftwise layer from its tables (``pad_hv`` (R*nk, 2E): horizontal offsets in
    the first E columns, vertical in the last E; ``idx_identit`` (R, E)) on an H x W map."""
    W = H if W is None else W
    F, twoE = pad_hv.shape
    R, E = idx_identit.shape
    if twoE != 2 * E or F % R:
        raise ValueError(f"inconsistent tables: pad_hv {tuple(pad_hv.shape)}, idx_identit {tuple(idx_identit.shape)}")
    nk = F // R
    e = (k - 1) - k // 2
    U = use_counts(pad_hv[:, :E].long(), pad_hv[:, E:].long(), idx_identit.long(), nk, H, W, e)
    used = (U > 0).double()
    return {"utilization": float(used.mean()), "mean_use": float(U.double().mean()),
            "per_filter": used.mean(dim=(0, 2, 3)), "counts": U}
