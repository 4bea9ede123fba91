"""heap.reuse_large_buffers (kernels/csrc/buffer_cache.cpp): while a quantization runs, freed
large CPU buffers are reused by size instead of being fresh, zero-filled mmaps."""
from __future__ import annotations

import os

import pytest
import torch

import gptqkit
from gptqkit import heap
from gptqkit.kernels import cpu

MiB = 1 << 20

needs_op = pytest.mark.skipif(cpu.get_op() is None, reason=f"no CPU op: {cpu.op_error()}")


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@needs_op
def test_freed_large_buffer_is_reused_with_its_contents_intact():
    with heap.reuse_large_buffers(64 * MiB) as cache:
        assert cache.on
        a = torch.full((2 * MiB // 4,), 3.0)
        p = _ptr(a)
        del a
        assert cache.stats()["cached_bytes"] >= 2 * MiB
        b = torch.empty(2 * MiB // 4 - 100)          # a little smaller: the same buffer serves
        assert _ptr(b) == p
        b.fill_(7.0)
        assert float(b.sum()) == 7.0 * b.numel()
        c = torch.empty(2 * MiB // 4)               # the cached one is taken: a fresh buffer
        assert _ptr(c) != p
        s = cache.stats()
        assert s["hits"] == 1 and s["misses"] == 2 and s["live"] == 2


@needs_op
def test_small_and_much_larger_requests_are_not_served_from_the_cache():
    with heap.reuse_large_buffers(64 * MiB) as cache:
        a = torch.empty(2 * MiB // 4)
        del a
        small = torch.empty(1000)                   # below the 1 MiB threshold: torch's allocator
        big = torch.empty(3 * MiB // 4)             # > 1/8 above the cached size: a fresh buffer
        s = cache.stats()
        assert s["hits"] == 0 and s["misses"] == 2 and s["live"] == 1   # `big` only
        assert small.numel() == 1000
        del big


@needs_op
def test_cap_unmaps_the_oldest_first():
    with heap.reuse_large_buffers(5 * MiB) as cache:
        ts = [torch.empty(2 * MiB // 4) for _ in range(3)]
        del ts                                      # 6 MiB freed into a 5 MiB cache
        s = cache.stats()
        assert s["evicted"] == 1 and s["cached_bytes"] == 4 * MiB
        again = [torch.empty(2 * MiB // 4) for _ in range(2)]
        assert cache.stats()["hits"] == 2 and cache.stats()["cached_bytes"] == 0
        del again


@needs_op
def test_kept_plus_in_use_never_exceeds_the_most_ever_in_use():
    """The cache must not raise the peak: a request it cannot serve first unmaps cached buffers
    until the new one fits under the most that was ever in use at once."""
    with heap.reuse_large_buffers(1 << 30) as cache:
        a = [torch.empty(2 * MiB // 4) for _ in range(4)]   # 8 MiB in use: the peak so far
        del a                                                # all 8 cached
        assert cache.stats()["cached_bytes"] == 8 * MiB
        b = torch.empty(3 * MiB // 4)                        # no cached size fits: 3 MiB fresh
        s = cache.stats()
        assert s["misses"] == 5 and s["evicted"] == 2        # 2 x 2 MiB given back: 3 + 4 <= 8
        assert s["cached_bytes"] + 3 * MiB <= 8 * MiB
        c = [torch.empty(2 * MiB // 4) for _ in range(2)]    # the 2 kept ones serve these
        assert cache.stats()["hits"] == 2
        del b, c


@needs_op
def test_tensors_outlive_the_cache_and_torch_allocator_comes_back():
    with heap.reuse_large_buffers(64 * MiB) as cache:
        kept = torch.arange(MiB, dtype=torch.float32)
    assert not cache.on and not heap.reuse_large_buffers.active
    assert float(kept[-1]) == MiB - 1                # still readable, freed by the cache's deleter
    del kept
    with heap.reuse_large_buffers(64 * MiB) as again:
        assert again.stats()["live"] == 0            # counts start over; nothing leaked in


def test_off_when_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("GPTQKIT_BUFFER_CACHE", "0")
    with heap.reuse_large_buffers(64 * MiB) as cache:
        assert not cache.on and cache.stats() is None


def test_off_without_the_cpu_op(monkeypatch):
    """No compiler (or GPTQKIT_CPU_OP=0): the run keeps torch's allocator."""
    monkeypatch.setattr(cpu, "get_op", lambda: None)
    with heap.reuse_large_buffers(64 * MiB) as cache:
        assert not cache.on and not heap.reuse_large_buffers.active


@needs_op
def test_quantize_writes_the_same_bytes_with_the_cache(tmp_path, tiny_llama_dir, tiny_text_file, monkeypatch):
    """The cache changes where buffers live, never a value: same checkpoint bytes, and it served
    the run (threshold lowered so the tiny model's activations count as large)."""
    monkeypatch.setattr(heap, "_MMAP_THRESHOLD", 16 << 10)
    served = []
    real_exit = heap.reuse_large_buffers.__exit__

    def spy_exit(self, *exc):
        if self.on:
            served.append(self.stats()["hits"])
        return real_exit(self, *exc)
    monkeypatch.setattr(heap.reuse_large_buffers, "__exit__", spy_exit)
    cfg = gptqkit.QuantizeConfig(bits=4, group_size=32)
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("GPTQKIT_BUFFER_CACHE", flag)
        out = tmp_path / f"q{flag}"
        gptqkit.quantize(str(tiny_llama_dir), str(tiny_text_file), str(out), cfg, nsamples=16, seqlen=64,
                         batch_size=4, progress=False)
        outs[flag] = (out / "model.safetensors").read_bytes()
    assert served and served[0] > 0
    assert outs["1"] == outs["0"]


def test_cap_follows_memory_and_device():
    from types import SimpleNamespace

    from gptqkit.pipeline.driver import _buffer_cache_cap
    cpu_handle, gpu_handle = SimpleNamespace(device="cpu"), SimpleNamespace(device="cuda:0")
    assert 0 < _buffer_cache_cap(cpu_handle, None) <= 1 << 30
    assert _buffer_cache_cap(cpu_handle, "800MB") <= 100_000_000   # an eighth of --max-memory
    assert _buffer_cache_cap(gpu_handle, None) == 0                # activations live on the GPU
