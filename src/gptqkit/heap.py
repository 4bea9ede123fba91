"""Giving freed heap memory back to the OS, shared by the quantization pipeline and the loader."""
from __future__ import annotations

import os as _os

_malloc_trim = None


def release_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise, and per-block buffers of
    many sizes would make the process grow with the number of blocks); a no-op elsewhere."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_MMAP_THRESHOLD = 1 << 20
_ARENA_MAX = 2
_mmap_set = False


def return_large_buffers() -> None:
    """Serve every allocation of 1 MiB or more with mmap, so freeing it returns it to the OS at
    once. glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed; from
    then on such buffers live in the heap, per thread arena, and the RSS keeps their sum: with
    the chunked in-flight mode (one thread per chunk) SmolLM2 (3 blocks, 8 chunks) peaked at
    2052 MiB instead of 1109. Also caps the number of malloc arenas (below). Process-wide and permanent (a fixed threshold also ends glibc's
    adjustment); a no-op off glibc."""
    global _mmap_set
    if _mmap_set:
        return
    _mmap_set = True
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, _MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        # M_ARENA_MAX: glibc gives each new thread its own heap arena (up to 8 per core), and the
        # chunked in-flight mode starts a thread per calibration chunk in every block; what those
        # arenas keep of their small buffers adds up. The chunks run one at a time, so sharing
        # arenas costs no lock contention. Measured on a 3-block SmolLM2 copy, 64 × 512 tokens:
        # peak RSS 1124-1135 MiB with glibc's default, 1079-1105 with 2 (benchmarks/results/
        # memory_arenas.txt).
        libc.mallopt(-8, _ARENA_MAX)
    except (OSError, AttributeError):
        pass


class reuse_large_buffers:
    """Context manager for a quantization run: freed CPU buffers of 1 MiB or more are kept for the
    next request of about their size (kernels/csrc/buffer_cache.cpp) instead of each being a fresh
    mmap that the kernel zeroes page by page on first touch (the price of return_large_buffers'
    fixed threshold, which keeps the peak bounded). The calibration chunks repeat the same shapes
    block after block, so most activations land on pages already touched. What is kept is capped
    by `cap` and by the rule that buffers in use plus kept never exceed the most ever in use at
    once, so the peak does not grow. 3-block SmolLM2 copy, 64 x 512 tokens, 1 thread: minor faults
    2.07-2.10 M -> 0.62 M, system time 6.6-7.1 -> 3.4-4.2 s, the same bytes, peak 1,057-1,061 vs
    1,073-1,082 MiB. A no-op where the C++ op cannot be built, or with GPTQKIT_BUFFER_CACHE=0.
    """

    active = False  # one run at a time uses the cache (the allocator is process-wide)

    def __init__(self, cap: int):
        self.cap, self.on = cap, False

    def __enter__(self) -> "reuse_large_buffers":
        if self.cap > 0 and not reuse_large_buffers.active and _os.environ.get("GPTQKIT_BUFFER_CACHE", "1") != "0":
            import torch
            from .kernels import cpu
            if cpu.get_op() is not None:
                self.on = bool(torch.ops.gptqkit.buffer_cache(self.cap, _MMAP_THRESHOLD)[0])
                reuse_large_buffers.active = self.on
        return self

    def stats(self) -> dict | None:
        """Requests served from the cache (hits), by a fresh mmap (misses), cached buffers
        unmapped to make room (evicted), bytes cached now, buffers in use; None when off."""
        if not self.on:
            return None
        import torch
        on, hits, misses, evicted, cached, live = torch.ops.gptqkit.buffer_cache(self.cap, 0)
        return dict(hits=hits, misses=misses, evicted=evicted, cached_bytes=cached, live=live)

    def __exit__(self, *exc) -> None:
        if self.on:
            import torch
            torch.ops.gptqkit.buffer_cache(0, 0)  # the previous allocator back, the cache unmapped
            self.on = reuse_large_buffers.active = False
