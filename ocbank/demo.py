"""A small streaming demo of ClusterBank on synthetic clustered vectors."""

from __future__ import annotations

import numpy as np

from .bank import ClusterBank


def main() -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((200, 1536)).astype(np.float32) * 2.0
    bank = ClusterBank(dim=1536, radius=26.0)
    for step in range(20):
        idx = rng.integers(0, len(centers), 784)
        bank.add(centers[idx] + rng.standard_normal((784, 1536), dtype=np.float32) * 0.45)
        print(f"batch {step:2d}: {bank.n_seen:6d} vectors -> {len(bank):4d} centroids")


if __name__ == "__main__":
    main()
