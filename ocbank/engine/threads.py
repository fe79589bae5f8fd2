"""One thread count for every compute pool in the process: torch's, faiss's OpenMP, and each BLAS."""

from __future__ import annotations


def set_compute_threads(threads: int) -> int:
    """Limit torch, faiss's OpenMP and every BLAS loaded in the process (numpy's included, through
    threadpoolctl) to ``threads``; return torch's count before, for a caller that gives it back.

    Results are bit-identical across processes only when these counts match (convolutions and
    BLAS sums are ordered by thread count), and a share of the cores (a serve replica's, a
    build worker's) must bound the BLAS as well as torch: the exact CPU search may run on
    numpy's BLAS, whose thread pool is its own.
    """
    import threadpoolctl  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from ._faiss import faiss  # noqa: PLC0415

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    threadpoolctl.threadpool_limits(limits=threads, user_api="blas")  # stays until set again
    return before
