"""The machine's read bandwidth, measured with numpy: the roofline decode's GB/s is set against."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def measure_bandwidth(threads: int, nbytes: int = 1 << 30, repeats: int = 3) -> dict:
    """Read bandwidth (GB/s, 1e9 bytes) of numpy reductions over disjoint chunks of one array in
    `threads` Python threads (numpy releases the GIL), best over a few kernels and `repeats` runs."""
    a = np.ones(max(nbytes, 64 * threads) // 4, dtype=np.float32)
    kernels = {
        "max_f32": (np.maximum.reduce, a),
        "or_u64": (np.bitwise_or.reduce, a[: a.size // 2 * 2].view(np.uint64)),
        "sum_f32": (np.add.reduce, a),
    }
    results = {}
    with ThreadPoolExecutor(threads) as ex:
        for name, (fn, arr) in kernels.items():
            chunks = np.array_split(arr, threads)
            best = float("inf")
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                list(ex.map(fn, chunks))
                best = min(best, time.perf_counter() - t0)
            results[name] = arr.nbytes / best / 1e9
    kernel = max(results, key=results.get)
    return {"threads": threads, "bytes": int(a.nbytes), "gb_s": results[kernel], "kernel": kernel, "by_kernel": results}
