"""Giving freed heap memory back to the OS, shared by the quantization pipeline and the loader."""
from __future__ import annotations

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
