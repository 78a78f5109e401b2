"""Memory bandwidth of this machine, measured the way decode reads weights: large streaming reads.

Decoding one token reads every LM weight once, so tokens/s can't beat bandwidth / weight bytes.
"""
from __future__ import annotations

import time

import numpy as np


def measure_read_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes per second for summing a buffer far larger than the caches (best of `repeats`)."""
    buf = np.ones(n_bytes // 4, dtype=np.float32)
    buf.sum()  # touch the pages once
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best


def measure_copy_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) for a large array copy."""
    src = np.ones(n_bytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


if __name__ == "__main__":
    print(f"read {measure_read_bandwidth() / 1e9:.1f} GB/s, "
          f"copy {measure_copy_bandwidth() / 1e9:.1f} GB/s")
