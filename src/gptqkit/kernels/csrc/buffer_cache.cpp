// Reuse of large CPU buffers while gptqkit quantizes (included by cpu_op.cpp; see gptqkit/heap.py).
//
// Why: the quantization pipeline serves every buffer of 1 MiB or more with its own mmap, so that
// freeing one returns it to the OS at once and the chunked in-flight mode's peak stays bounded
// (heap.py). The price is that every activation of every chunk's forward lands on fresh pages
// that the kernel zeroes on first touch: on SmolLM2 ~2 million minor faults and a third of the
// run's system time (`clear_page_erms`). The chunks repeat the same shapes, so a cache of freed
// large buffers, matched by size, serves most of them with pages already touched.
//
// While enabled, this allocator is torch's CPU allocator (c10::SetCPUAllocator): buffers below
// `threshold` go to the allocator it replaced, larger ones are mmapped here and, when freed, kept
// for the next request of a size within 1/8 above. What it keeps is bounded twice: by `cap`, and
// so that its buffers in use plus those it keeps never exceed the most that was ever in use at
// once (`peak_live`): the cache never raises the run's peak, it only fills the room below it.
// To make room it unmaps the buffers freed longest ago. Disabling restores the previous allocator
// and unmaps the cache; buffers still alive keep working (their deleter is this file's, which
// unmaps them once disabled).
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace gk_cache {

struct Idle {
    void* p;
    size_t size;
};

std::mutex mu;
c10::Allocator* prev = nullptr;          // the allocator replaced while enabled
c10::DeleterFnPtr prev_raw = nullptr;    // its raw deleter (raw_allocate'd small buffers)
bool enabled = false;
size_t threshold = 1 << 20, cap = 0, cached = 0;
size_t live_bytes = 0, peak_live = 0;  // our buffers in use: now, and the most at any time
int64_t hits = 0, misses = 0, evicted = 0;
std::unordered_map<void*, size_t> live;                     // our buffers in use -> mapped size
std::list<Idle> idle;                                       // freed buffers, oldest first
std::multimap<size_t, std::list<Idle>::iterator> by_size;   // the same, by size

void unmap_all(std::vector<Idle>& out) {  // with mu held; unmapped by the caller, outside the lock
    for (auto& b : idle) out.push_back(b);
    idle.clear();
    by_size.clear();
    cached = 0;
}

// Unmap the oldest cached buffers until `need` more bytes fit: in the cap, and with the live ones
// within the most that was ever live (so the cache never raises the footprint above that peak).
void drop_oldest(size_t need, std::vector<Idle>& out) {  // with mu held
    const size_t room = std::min(cap, std::max(peak_live, live_bytes + need) - live_bytes);
    while (!idle.empty() && cached + need > room) {
        Idle b = idle.front();
        auto range = by_size.equal_range(b.size);
        for (auto it = range.first; it != range.second; ++it)
            if (it->second == idle.begin()) { by_size.erase(it); break; }
        idle.pop_front();
        cached -= b.size;
        ++evicted;
        out.push_back(b);
    }
}

void release(std::vector<Idle>& bs) {
    for (auto& b : bs) munmap(b.p, b.size);
}

void deleter(void* p) {
    std::vector<Idle> gone;
    {
        std::lock_guard<std::mutex> lk(mu);
        auto it = live.find(p);
        if (it == live.end()) {  // a small buffer of the previous allocator, freed through raw_deleter
            if (prev_raw) prev_raw(p);
            return;
        }
        const size_t size = it->second;
        live.erase(it);
        live_bytes -= size;
        if (enabled && size <= cap) {
            drop_oldest(size, gone);
            idle.push_back({p, size});
            by_size.emplace(size, std::prev(idle.end()));
            cached += size;
        } else {
            gone.push_back({p, size});
        }
    }
    release(gone);
}

struct Allocator final : c10::Allocator {
    c10::DataPtr allocate(size_t n) override {
        c10::Allocator* fallback;
        size_t thr;
        {
            std::lock_guard<std::mutex> lk(mu);
            fallback = prev;
            thr = threshold;
        }
        if (n < thr) return fallback->allocate(n);
        size_t size = (n + 4095) & ~size_t(4095);
        void* p = nullptr;
        {
            std::lock_guard<std::mutex> lk(mu);
            auto it = by_size.lower_bound(size);
            if (it != by_size.end() && it->first <= size + size / 8) {
                p = it->second->p;
                size = it->first;
                idle.erase(it->second);
                by_size.erase(it);
                cached -= size;
                ++hits;
            } else {
                ++misses;
            }
        }
        if (p == nullptr) {
            std::vector<Idle> gone;  // none of the cached sizes fit: room for the new one first
            {
                std::lock_guard<std::mutex> lk(mu);
                live_bytes += size;
                drop_oldest(0, gone);
                live_bytes -= size;
            }
            release(gone);
            p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) {  // the cache's pages may be what is missing: give them back, retry
                std::vector<Idle> gone;
                {
                    std::lock_guard<std::mutex> lk(mu);
                    unmap_all(gone);
                }
                release(gone);
                p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                TORCH_CHECK(p != MAP_FAILED, "gptqkit: out of memory allocating ", n, " bytes on the CPU");
            }
        }
        {
            std::lock_guard<std::mutex> lk(mu);
            live.emplace(p, size);
            live_bytes += size;
            peak_live = std::max(peak_live, live_bytes);
        }
        return {p, p, &deleter, c10::Device(c10::DeviceType::CPU)};
    }
    c10::DeleterFnPtr raw_deleter() const override { return &deleter; }
    void copy_data(void* dest, const void* src, std::size_t count) const override {
        std::memcpy(dest, src, count);
    }
};

Allocator instance;

// cap > 0: enable (or change the cap/threshold); cap <= 0: disable and give the cache back.
// -> [enabled, hits, misses, evicted, cached bytes, live buffers]
std::vector<int64_t> configure(int64_t new_cap, int64_t new_threshold) {
    std::vector<Idle> gone;
    {
        std::lock_guard<std::mutex> lk(mu);
        if (new_cap > 0) {
            if (!enabled) {
                c10::Allocator* current = c10::GetCPUAllocator();
                if (current != &instance) {
                    prev = current;
                    prev_raw = current->raw_deleter();
                    c10::SetCPUAllocator(&instance, /*priority=*/0);
                }
                enabled = c10::GetCPUAllocator() == &instance;  // false: another allocator outranks ours
                hits = misses = evicted = 0;
                peak_live = live_bytes;
            }
            cap = (size_t)new_cap;
            if (new_threshold > 0) threshold = (size_t)new_threshold;
            if (enabled) drop_oldest(0, gone);
        } else {
            if (enabled && c10::GetCPUAllocator() == &instance) c10::SetCPUAllocator(prev, /*priority=*/0);
            enabled = false;
            unmap_all(gone);
        }
    }
    release(gone);
    std::lock_guard<std::mutex> lk(mu);
    return {enabled ? 1 : 0, hits, misses, evicted, (int64_t)cached, (int64_t)live.size()};
}

}  // namespace gk_cache
