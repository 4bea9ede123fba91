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
