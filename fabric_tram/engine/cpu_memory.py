"""CPU allocations: keep freed memory for reuse, as PyTorch's CUDA caching allocator does on a GPU.

By default glibc's malloc unmaps every freed block of 32 MiB or more and trims the heap's free top, so each
step's large CPU tensors (logits and log-probabilities are positions × vocabulary floats: 64 MiB at 2,048 ×
8,192) come back as fresh pages that fault and are zero-filled on first touch. Measured on this project's CPU
machine (`benchmarks/step_cost.py`): ~77,000 page faults per adam step at the `small` size, 541 ms per step
against 467 ms with freed memory kept; r3f, which holds two graphs, 1,261 ms against 939 ms. The price: the
process's resident size stays at its high-water mark, as GPU memory does under the caching allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h


def keep_freed_cpu_memory() -> bool:
    """Tell glibc's malloc (this process, from now on) to serve every block from its heap and never give freed
    memory back to the system. Returns False, having done nothing, where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)))
