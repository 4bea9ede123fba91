// gptqkit CPU kernels as a torch custom op: `torch.ops.gptqkit.cpu_linear`.
//
// Built at first use by gptqkit/kernels/cpu.py against the installed torch's headers and
// libraries (the system C++ compiler, no ninja) and loaded with torch.ops.load_library. It is
// the same kernel source as the ctypes library (cpu_kernels.cpp, included below); what this file
// adds is the whole QuantLinear forward in C++ — reshape, act-order column gather, dtype
// handling, fused GEMV or tile-dequantize + BLAS, bias, output dtype — behind one dispatcher
// call, so a decode step pays no per-layer Python argument marshalling (the ctypes path builds
// ctypes arguments and several torch calls in Python per layer). Being a registered op, it also
// runs under torch.compile (cpu.py registers its fake implementation) and in inference_mode.
//
// Every step mirrors CpuBackend's ctypes path operation for operation (same thread count, same
// tiles, same order of the bias add and dtype casts), so the two paths are bit-equal; the
// tests check that.
#include "cpu_kernels.cpp"
#include "buffer_cache.cpp"

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <vector>

namespace {

// cpu.py's thread rule: torch's thread count, but no more than one thread per ~0.5 M
// multiply-adds (waking a second thread costs more than it saves on tiny layers), and no more
// than one per work item of the kernel: a 64-column block (dot-product kernel), or a block and
// a chunk of 12 rows (FMA kernel, which also splits rows when blocks are fewer than threads).
int64_t threads_for(int64_t M, int64_t K, int64_t N, int64_t nblk, bool dp) {
    int64_t nt = std::min<int64_t>(at::get_num_threads(), (M * K * N) >> 19);
    nt = std::min(nt, dp ? nblk : nblk * std::max<int64_t>(1, (M + 11) / 12));
    return std::max<int64_t>(1, nt);
}

at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                      const at::Tensor& sz, const at::Tensor& seg, const at::Tensor& gk,
                      const std::optional<at::Tensor>& perm, const std::optional<at::Tensor>& bias,
                      int64_t N, int64_t bits, int64_t dp, int64_t gemm_min_m, int64_t tile_bytes,
                      int64_t i8_min_m, int64_t i8_block) {
    TORCH_CHECK(x.device().is_cpu(), "gptqkit::cpu_linear: x must be on the CPU, got ", x.device());
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == gk.numel(), "gptqkit::cpu_linear: x has ",
                x.dim() ? x.size(-1) : 0, " features, the layer takes ", gk.numel());
    const int64_t K = x.size(-1);
    const int64_t G = seg.numel() - 1, nblk = s.size(0);
    TORCH_CHECK(w.is_contiguous() && s.is_contiguous() && sz.is_contiguous() && seg.is_contiguous()
                && gk.is_contiguous() && s.size(1) == G && s.size(2) == 64 && nblk * 64 >= N
                && (!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous()
                                          && bias->numel() == N)),
                "gptqkit::cpu_linear: the layout tensors do not match (prepare the layer again)");
    // Decode calls (contiguous x, no act-order) go straight to the kernel on x's memory: every
    // ATen call avoided here is a dispatcher round trip saved per layer and token.
    at::Tensor x2 = x;
    if (perm.has_value()) x2 = x.reshape({-1, K}).index_select(1, *perm);
    else if (!x.is_contiguous()) x2 = x.contiguous();
    const int64_t M = K ? x2.numel() / K : 0;
    const int64_t nt = threads_for(M, K, N, nblk, dp != 0);
    // y in x's leading shape (its memory is [M, N] row-major either way), fp32
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = N;
    at::Tensor y = at::detail::empty_cpu(shape, at::kFloat);
    float* Y = y.data_ptr<float>();
    int rc = 0;
    if (i8_min_m > 0 && M >= i8_min_m) {
        // prefill sizes of a 4-bit layer: int8 activations (cpu_kernels.cpp, gk_gemm_i8)
        at::Tensor xin = x2.scalar_type() == at::kFloat ? x2 : x2.to(at::kFloat).contiguous();
        rc = gk_gemm_i8(w.data_ptr<uint8_t>(), s.data_ptr<float>(), sz.data_ptr<float>(),
                        seg.data_ptr<int32_t>(), (int)K, (int)G, (int)nblk, xin.data_ptr<float>(),
                        (int)M, Y, (int)N, (int)i8_block, (int)nt);
    } else if (M < gemm_min_m) {
        if (M) {
            if (dp) {
                // bf16 x goes in as is (exact); anything else as fp32, split into 2 bf16 parts
                // (exact for fp16 values) or 3 (exact for any fp32)
                const bool xbf = x2.scalar_type() == at::kBFloat16;
                const int nsplit = xbf ? 1 : (x2.scalar_type() == at::kHalf ? 2 : 3);
                at::Tensor xin = (xbf || x2.scalar_type() == at::kFloat) ? x2 : x2.to(at::kFloat).contiguous();
                rc = gk_gemv_dp(w.data_ptr<uint8_t>(), s.data_ptr<float>(), sz.data_ptr<float>(),
                                seg.data_ptr<int32_t>(), (int)K, (int)G, (int)nblk, xin.data_ptr(),
                                xbf ? 1 : 0, nsplit, (int)M, Y, (int)N, (int)nt);
            } else {
                at::Tensor xin = x2.scalar_type() == at::kFloat ? x2 : x2.to(at::kFloat).contiguous();
                rc = gk_gemv(w.data_ptr<uint8_t>(), s.data_ptr<float>(), sz.data_ptr<float>(),
                             seg.data_ptr<int32_t>(), (int)bits, (int)K, (int)G, (int)nblk,
                             xin.data_ptr<float>(), (int)M, Y, (int)N, (int)nt);
            }
        }
    } else {
        // dequantize tiles of whole 64-column blocks (tile_bytes of fp32 at a time, never the
        // whole matrix) and hand each to torch's BLAS matmul
        at::Tensor xf = x2.reshape({M, K}).to(at::kFloat).contiguous();
        at::Tensor y2 = y.view({M, N});
        const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(nblk, tile_bytes / (K * 64 * 4)));
        at::Tensor tile = at::empty({K, nb * 64}, xf.options());
        for (int64_t b0 = 0; b0 < nblk && rc == 0; b0 += nb) {
            const int64_t cnt = std::min(nb, nblk - b0);
            at::Tensor t = cnt == nb ? tile : at::empty({K, cnt * 64}, xf.options());
            if (dp)
                rc = gk_dequant_dp(w.data_ptr<uint8_t>(), s.data_ptr<float>(), sz.data_ptr<float>(),
                                   gk.data_ptr<int32_t>(), (int)K, (int)G, (int)b0, (int)cnt,
                                   t.data_ptr<float>(), (int)nt);
            else
                rc = gk_dequant(w.data_ptr<uint8_t>(), s.data_ptr<float>(), sz.data_ptr<float>(),
                                gk.data_ptr<int32_t>(), (int)bits, (int)K, (int)G, (int)b0, (int)cnt,
                                t.data_ptr<float>(), (int)nt);
            const int64_t n0 = b0 * 64, n1 = std::min(N, (b0 + cnt) * 64);
            // straight into y's columns, as cpu.py does: mm writes a row-major column slice in
            // place (leading dimension N), no temporary and no copy
            at::Tensor yc = y2.narrow(1, n0, n1 - n0);
            at::mm_out(yc, xf, t.narrow(1, 0, n1 - n0));
        }
    }
    TORCH_CHECK(rc == 0, "the gptqkit CPU kernel returned error code ", rc,
                "; load with backend='torch' to use the reference kernel");
    if (bias.has_value()) {  // in place, as torch's add_ does (an exact fp32 add per element)
        const float* b = bias->data_ptr<float>();
        for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) Y[m * N + n] += b[n];
    }
    const at::ScalarType out = x.is_floating_point() ? x.scalar_type() : at::kFloat;
    return out == at::kFloat ? y : y.to(out);
}

}  // namespace

extern "C" int gk_op_abi_version(void) { return 2; }

TORCH_LIBRARY(gptqkit, m) {
    m.def("cpu_linear(Tensor x, Tensor w, Tensor s, Tensor sz, Tensor seg, Tensor gk, Tensor? perm, "
          "Tensor? bias, int N, int bits, int dp, int gemm_min_m, int tile_bytes, int i8_min_m, int i8_block) -> Tensor");
    // the large-buffer cache of quantization (buffer_cache.cpp, gptqkit/heap.py)
    m.def("buffer_cache(int cap, int threshold) -> int[]", &gk_cache::configure);
}

TORCH_LIBRARY_IMPL(gptqkit, CPU, m) { m.impl("cpu_linear", &cpu_linear); }
