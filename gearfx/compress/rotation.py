"""A fixed orthogonal rotation of each head's channels: Hadamard with seeded random sign flips.

    R = diag(s) @ H / sqrt(D),   s in {-1, +1}^D drawn from the recipe's seed,  R @ R^T = I

Keys have a few outlier channels that stretch every per-channel and per-token range; rotating
spreads each channel's energy evenly over all D channels, so quantization ranges are tighter and
the error is spread across channels (QuaRot, SpinQuant). Without the sign flips a Hadamard
rotation leaves structured inputs (e.g. a constant channel) concentrated, and helps far less.

Rotating q, k and v by the same R leaves attention unchanged in exact arithmetic:
(q R)(k R)^T = q k^T, and softmax(.) (v R) R^T = softmax(.) v. The cache stores rotated keys and
values; the attention output is rotated back with R^T. One R is shared by every head of a layer,
so grouped query heads need nothing special.
"""

from __future__ import annotations

import torch

_PRIME = 2**31 - 1  # hash modulus: every product below stays under 2**62, so int64 never overflows
_ROUNDS = (1013904223, 1664525, 22695477)
_MAX_LOG2_DIM = 16  # head_dim up to 65536


def _bit(x: torch.Tensor, bit: int) -> torch.Tensor:
    """Bit `bit` of non-negative integers x, with // and % only (Inductor's CPU backend failed to
    compile bitwise ops on int64 in dynamic-shape kernels)."""
    return x // 2**bit % 2


def signs(head_dim: int, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The D random signs (+1. / -1.) [D] fp32 of seed `seed`.

    Each channel's sign is a middle bit of a few rounds of the quadratic map x -> x*x + c modulo a
    prime, started from (channel, seed), rather than a torch.Generator draw: plain integer ops on
    an arange, so the rotation is a function of the recipe alone, traces into export and Inductor
    graphs, and does not touch torch's global RNG. (Checked: balanced, no correlation between
    neighbouring channels or between seeds beyond chance.)
    """
    x = (torch.arange(head_dim, device=device) * 48271 + seed % _PRIME * 69621 + 12345) % _PRIME
    for c in _ROUNDS:
        x = (x * x + c) % _PRIME
    return 1.0 - 2.0 * _bit(x, 16).float()


def matrix(head_dim: int, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """R [D, D] fp32 (see the module docstring); D must be a power of 2 (Sylvester's Hadamard).

    H[i, j] = (-1) ** popcount(i & j), built from aranges so export and Inductor see plain ops.
    """
    if isinstance(head_dim, int) and (head_dim < 1 or head_dim & (head_dim - 1)):
        raise ValueError(f"a Hadamard rotation needs a power-of-2 head_dim, not {head_dim}")
    i = torch.arange(head_dim, device=device)
    # a fixed count: head_dim may be symbolic while tracing
    bits = torch.stack([_bit(i, bit) for bit in range(_MAX_LOG2_DIM)], dim=-1).float()  # [D, 16]
    # popcount(i & j) as one small matmul (exact in fp32: at most 16): the compiled decode step
    # rebuilds R every call, and integer // and % over all D x D x 16 bits cost milliseconds
    parity = bits @ bits.mT
    h = 1.0 - 2.0 * (parity % 2)
    return signs(head_dim, seed, device)[:, None] * h / head_dim**0.5


def rotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ R, computed in fp32 and returned in x's dtype."""
    return (x.float() @ r).to(x.dtype)


def unrotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ R^T (the inverse of `rotate`), computed in fp32 and returned in x's dtype."""
    return (x.float() @ r.mT).to(x.dtype)
