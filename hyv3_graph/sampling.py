"""Host-side sampling over one row of logits, O(V) at Hy3's vocab (120832).

Greedy is an argmax. Otherwise: top-k by `argpartition` (O(V)), softmax at the temperature over what is
left, and top-p over a sorted prefix that grows (64, 128, ... candidates) until it holds the requested
mass, so only the few candidates that matter are sorted; a full sort happens only when the mass is spread
over most of the vocab. The draw is one uniform number against the cumulative mass, found through block
sums (`_draw`) rather than a running sum over all of V.
"""

from __future__ import annotations

import math

import numpy as np


class SamplingError(ValueError):
    """A sampling parameter outside its range."""


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """The ranges `sample` accepts; the CLI reports the same ones for its flags."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise SamplingError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise SamplingError(f"top_p must be in (0, 1], got {top_p!r}")


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float) -> int:
    """One token id from finite float32 logits [V]."""
    if temperature <= 0:
        return int(np.argmax(logits))
    ids = None  # candidate token ids; None = all of them
    if 0 < top_k < logits.size:
        ids = np.argpartition(logits, logits.size - top_k)[logits.size - top_k:]
        logits = logits[ids]
    p = np.multiply(logits, np.float32(1.0 / temperature), dtype=np.float32)  # [n]; one buffer, in place below
    p -= p.max()
    np.exp(p, out=p)  # unnormalized probabilities
    if top_p < 1.0:
        keep = _nucleus(p, top_p)  # indices into p, most probable first
        p = p[keep]
        ids = keep if ids is None else ids[keep]
    pick = _draw(p, rng.random())
    return int(pick if ids is None else ids[pick])


_DRAW_BLOCK = 1024


def _draw(p: np.ndarray, u: float) -> int:
    """The index i where the cumulative mass crosses u * total. A running sum over all of V is sequential
    (~1 ms at Hy3's vocab); block sums are vectorized, so only one block of 1024 is summed in order."""
    n = p.size
    blocks = np.add.reduceat(p, np.arange(0, n, _DRAW_BLOCK), dtype=np.float64)  # [ceil(n / 1024)]
    cdf = np.cumsum(blocks)
    target = u * cdf[-1]
    b = min(int(np.searchsorted(cdf, target, side="right")), blocks.size - 1)
    inner = np.cumsum(p[b * _DRAW_BLOCK:(b + 1) * _DRAW_BLOCK], dtype=np.float64)
    j = int(np.searchsorted(inner, target - (cdf[b - 1] if b else 0.0), side="right"))
    return min(b * _DRAW_BLOCK + j, n - 1)


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """The smallest most-probable prefix of `p` whose mass reaches top_p of the total (ties: lower index first)."""
    target = top_p * float(p.sum(dtype=np.float64))
    m = min(64, p.size)
    while True:
        top = np.argpartition(-p, m - 1)[:m] if m < p.size else np.arange(p.size)
        top = top[np.lexsort((top, -p[top]))]  # by probability, then by id: deterministic
        mass = np.cumsum(p[top], dtype=np.float64)
        if mass[-1] >= target or m == p.size:
            return top[: int(np.searchsorted(mass, target, side="left")) + 1]
        m = min(2 * m, p.size)
