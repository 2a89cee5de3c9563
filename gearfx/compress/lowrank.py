"""GEAR's low-rank correction: rank-r factors of a residual by seeded, orthogonalised power iteration.

All functions are batched over leading dims (batch, head, chunk) and use only matmuls and
elementwise ops, so they compile and run the same on every backend.
"""

from __future__ import annotations

import torch


def start_vectors(dim: int, rank: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded pseudo-random starting block [dim, rank] (fp32, entries in [-0.5, 0.5)).

    A closed-form hash of the indices and the seed rather than a torch.Generator: it is the same
    inside any trace (export, torch.compile) as in eager code, and needs no stored constant.
    """
    i = torch.arange(dim, device=device, dtype=torch.float64)[:, None]
    j = torch.arange(rank, device=device, dtype=torch.float64)[None, :]
    h = torch.sin(i * 12.9898 + j * 78.233 + seed * 37.719) * 43758.5453
    return (h - h.floor() - 0.5).float()


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """Modified Gram-Schmidt on the columns of p [..., n, r]; a zero column stays zero.

    Explicit Gram-Schmidt instead of torch.linalg.qr: r is tiny (1-8), it is deterministic across
    backends, and it compiles into plain kernels.
    """
    cols = []
    for j in range(p.shape[-1]):
        v = p[..., j]
        for u in cols:
            v = v - (u * v).sum(-1, keepdim=True) * u
        norm = v.norm(dim=-1, keepdim=True)
        cols.append(v / norm.clamp_min(torch.finfo(v.dtype).tiny) * (norm > 0))
    return torch.stack(cols, dim=-1)


def power_iteration(
    m: torch.Tensor, start: torch.Tensor, loops: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of m [..., n, d]: m ≈ a @ b.mT with a [..., n, r], b [..., d, r].

    start: [d, r] starting block (see `start_vectors`); loops: power-iteration loops (>= 1).
    `a` has orthonormal columns and b = m.mT @ a, so a @ b.mT is the projection of m on span(a):
    the correction never increases the Frobenius error, whatever the number of loops.
    """
    m = m.float()
    b = start.to(m.device).expand(*m.shape[:-2], *start.shape)
    for _ in range(loops):
        a = orthonormalize(m @ b)
        b = m.mT @ a
    return a, b
