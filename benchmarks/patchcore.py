"""PatchCore baselines for the harness: the full memory bank and the greedy coreset.

The coreset follows the PatchCore paper (Roth et al., 2022, Sec. 3.2): patches
are projected to 128 dimensions with a random Gaussian projection
(Johnson-Lindenstrauss), then the approximate greedy coreset repeatedly picks
the patch farthest from the set chosen so far, starting from a random patch.
"""

from __future__ import annotations

import numpy as np
import torch


def random_projection(features: torch.Tensor, dim: int = 128, seed: int = 0) -> torch.Tensor:
    """[n, d] -> [n, dim] with a seeded Gaussian matrix scaled by 1/sqrt(dim)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    proj = torch.randn(features.shape[1], dim, generator=gen) / dim**0.5
    return features @ proj.to(features.device, features.dtype)


def greedy_coreset(features: np.ndarray | torch.Tensor, ratio: float, proj_dim: int = 128, seed: int = 0,
                   device: str = "cpu") -> np.ndarray:
    """Indices [m] of the approximate greedy coreset, m = max(1, round(ratio * n)).

    features: [n, d]. Farthest-point iterations in the projected space; each
    step updates every patch's distance to the chosen set with the new pick.
    """
    x = torch.as_tensor(np.asarray(features, dtype=np.float32) if isinstance(features, np.ndarray) else features)
    x = x.to(device=device, dtype=torch.float32)
    n = x.shape[0]
    m = max(1, int(round(ratio * n)))
    z = random_projection(x, proj_dim, seed) if x.shape[1] > proj_dim else x
    rng = np.random.default_rng(seed)
    chosen = np.empty(m, dtype=np.int64)
    chosen[0] = int(rng.integers(n))
    min_dist = torch.linalg.vector_norm(z - z[chosen[0]], dim=1)
    for i in range(1, m):
        nxt = int(torch.argmax(min_dist))
        chosen[i] = nxt
        min_dist = torch.minimum(min_dist, torch.linalg.vector_norm(z - z[nxt], dim=1))
    return chosen
