// The RSR conv on CPU as a blocked implicit GEMM over the token-layout im2col (rsr_gather.h):
//   resnas::ext_rsr_conv_fwd / _bwd (schemas and semantics in ../rsr.h).
//
// Design and caveats:
// - conv (the CPU fast path of the fused RSR): materialising the whole (B, Ho*Wo, Ci*k*k) column tensor costs a
//   fresh 40-150 MB allocation per call at ViT-ResNAS shapes, whose first-touch page faults took as long as a third of
//   the GEMM (BENCHMARKS.md). So, per group and per block of whole samples (~kBlockRows rows), the columns are
//   gathered into one reused buffer with the group's compact row length ci*k*k, then one BLAS GEMM with
//   W[:co, :ci*k*k] writes the block's output rows (zeros beyond co). Backward re-gathers each block: dW[:co, :K] +=
//   dY^T @ cols (groups and blocks in a fixed order: reproducible run to run at a fixed thread count; BLAS does not
//   promise bit-equality across thread counts), dcols = dY @ W[:co, :K] into a block buffer, then col2im (a gather,
//   within the block's own samples) into du.
// - fp32 forward on a torch built with oneDNN (the default x86 build), for large groups only: the conv runs per group
//   as oneDNN's direct convolution (at::convolution) on the channels-last image that the token layout already is
//   (patch tokens of the group's samples, first ci channels: one compacting copy, no NCHW round trip), writing
//   (b, Ho, Wo, co) that is copied into the output rows. Every call copies the group's weight slice and oneDNN
//   reorders it (and the image) into its blocked layouts: work that grows with ci*co*k*k, not with the rows. So oneDNN
//   only pays off once a group's GEMM has enough rows (nb * Ho*Wo >= kOnednnFwdMinRows) to amortise it; below, the
//   blocked path, whose BLAS GEMMs read the weight slice in place, is faster. Route 'blocked'
//   (RESNAS_RSR_CONV=blocked in Python) forces the blocked path (tests compare both).
// - The backward is always the blocked path: oneDNN's convolution_backward computed dweight with 4-7x the error of
//   an fp32 GEMM over the same rows (its reductions over 5k-20k rows), beyond the tests' accuracy rule.
// - The conv computes in fp32 for fp16 / bf16 inputs (the block buffers are fp32; one rounding of the output), fp64
//   for fp64; dweight is returned in that accumulation dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "blas.h"
#include "rsr_gather.h"

namespace resnas {
namespace {

using cpu_blas::gemm;
using cpu_blas::Scratch;
using rsr_cpu::col2im_row;
using rsr_cpu::gather_row_any;
using rsr_cpu::row_sources;

constexpr const char* kConvFwdName = "ext_rsr_conv_fwd";
constexpr const char* kConvBwdName = "ext_rsr_conv_bwd";
// GEMM rows per block of the conv (rounded to whole samples): large enough for BLAS efficiency, small enough that
// the block buffers (rows x ci*k*k) stay a few MB and are reused within the call.
constexpr int64_t kBlockRows = 512;
// Rows of a group's GEMM (samples x Ho*Wo) from which oneDNN's conv beats the blocked path (see the top comment).
constexpr int64_t kOnednnFwdMinRows = 2048;

// ---- the blocked implicit-GEMM conv ---------------------------------------------------------------------------------
struct ConvArgs {
  rsr_detail::Im2colArgs im;  // geometry, input widths (ci), channels of u
  GroupTable out;             // output widths (co)
  int64_t co_max;
};

ConvArgs check_conv(const at::Tensor& u, const at::Tensor& weight, c10::IntArrayRef sizes, const at::Tensor& in_widths,
                    const at::Tensor& out_widths, c10::IntArrayRef grid, int64_t k, int64_t stride, int64_t padding,
                    bool has_cls, const char* op) {
  ConvArgs a{rsr_detail::check_im2col_fwd(u, sizes, in_widths, grid, k, stride, padding, has_cls, at::kCPU, op), {},
             0};
  TORCH_CHECK(weight.defined() && weight.dim() == 2 && weight.size(1) == a.im.channels * a.im.geo.taps(), op,
              ": weight must be 2-D (Co_max, C*k*k) = (Co_max, ", a.im.channels * a.im.geo.taps(),
              ") (conv_weight.view(Co_max, -1)), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == u.scalar_type() || weight.scalar_type() == at::kFloat, op,
              ": weight must have u's dtype (", u.scalar_type(), ") or Float, got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == u.device(), op, ": weight must be on u's device ", u.device(), ", got ",
              weight.device());
  a.co_max = weight.size(0);
  a.out = rsr_detail::rsr_group_table(sizes, out_widths, u, a.co_max, op, "out_widths", "weight (out channels)");
  return a;
}

// Fills buf (rows x ci*kk, compact) with the columns of samples [s0, s0 + nb).
template <typename scalar_t, typename acc_t>
void gather_block(const scalar_t* u, const scalar_t* zeros, acc_t* buf, const RsrGeometry& geo, int64_t C, int64_t s0,
                  int64_t nb, int64_t ci) {
  const int64_t L = geo.out_patches(), kk = geo.taps(), K = ci * kk;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  at::parallel_for(0, nb * L, grain, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> srcs(static_cast<size_t>(kk));
    for (int64_t r = begin; r < end; ++r) {
      row_sources(u, zeros, geo, C, s0 + r / L, r % L, srcs.data());
      gather_row_any(buf + r * K, srcs.data(), ci, kk);
    }
  });
}

// Whole samples per block of the blocked path (about kBlockRows GEMM rows, at least one sample of L rows).
inline int64_t samples_per_block(int64_t L) { return std::max<int64_t>(1, kBlockRows / std::max<int64_t>(L, 1)); }

// Calls fn(g, ci, co, s0, nb) for every block of whole samples of every group with rows, in group / block order.
template <typename Fn>
void for_each_block(const ConvArgs& a, Fn&& fn) {
  const int64_t L = a.im.geo.out_patches();
  const int64_t block_samples = samples_per_block(L);
  for (int64_t g = 0; g < a.im.groups.num_groups(); ++g) {
    const int64_t begin = a.im.groups.row_start[g], end = a.im.groups.row_start[g + 1];
    for (int64_t s0 = begin; s0 < end; s0 += block_samples)
      fn(g, a.im.groups.widths[g], a.out.widths[g], s0, std::min(block_samples, end - s0));
  }
}

void check_route(c10::string_view route, const char* op) {
  TORCH_CHECK_VALUE(route == "auto" || route == "blocked", op, ": route must be 'auto' or 'blocked', got '", route,
                    "'");
}

// The forward's oneDNN route: fp32, a torch with oneDNN enabled, route 'auto' ('blocked' forces the blocked path;
// Python passes RESNAS_RSR_CONV's choice), and a group with at least kOnednnFwdMinRows GEMM rows (decided per call on
// the largest group: one route for all groups).
bool use_onednn_conv(const at::Tensor& u, const ConvArgs& a, c10::string_view route) {
  int64_t max_rows = 0;
  for (int64_t g = 0; g < a.im.groups.num_groups(); ++g)
    max_rows = std::max(max_rows, (a.im.groups.row_start[g + 1] - a.im.groups.row_start[g]) * a.im.geo.out_patches());
  return route == "auto" && max_rows >= kOnednnFwdMinRows && u.scalar_type() == at::kFloat && at::hasMKLDNN() &&
         at::globalContext().userEnabledMkldnn();
}

// Patch tokens of samples [s0, s0 + nb), first ci channels, as an (nb, ci, H, W) image: a strided view of u (B, N, C)
// whose channel stride is 1, i.e. channels-last up to the padding channels and the cls row (the caller compacts it).
at::Tensor patch_image(const at::Tensor& u, const RsrGeometry& geo, int64_t s0, int64_t nb, int64_t ci) {
  const int64_t N = u.size(1), C = u.size(2);
  return u.as_strided({nb, ci, geo.H, geo.W}, {N * C, 1, geo.W * C, C}, u.storage_offset() + s0 * N * C + geo.n_cls * C);
}

// conv of one group (samples [s0, s0 + nb), ci -> co) with oneDNN, written into out2d's rows (first co columns).
void onednn_conv_group(const at::Tensor& u, const at::Tensor& w2d, at::Tensor& out2d, const RsrGeometry& geo,
                       int64_t C, int64_t s0, int64_t nb, int64_t ci, int64_t co) {
  const at::Tensor img = patch_image(u, geo, s0, nb, ci).contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w4 = w2d.view({w2d.size(0), C, geo.k, geo.k}).narrow(0, 0, co).narrow(1, 0, ci).contiguous();
  const at::Tensor y = at::convolution(img, w4, c10::nullopt, {geo.stride, geo.stride}, {geo.padding, geo.padding},
                                       {1, 1}, false, {0, 0}, 1);  // (nb, co, Ho, Wo)
  out2d.narrow(0, s0 * geo.out_patches(), nb * geo.out_patches()).narrow(1, 0, co)
      .view({nb, geo.Ho, geo.Wo, co}).copy_(y.permute({0, 2, 3, 1}));
}

}  // namespace

at::Tensor rsr_conv_fwd_cpu(const at::Tensor& u_in, const at::Tensor& weight_in, c10::IntArrayRef sizes,
                            const at::Tensor& in_widths, const at::Tensor& out_widths, c10::IntArrayRef grid,
                            int64_t kernel_size, int64_t stride, int64_t padding, bool has_cls,
                            c10::string_view route) {
  const ConvArgs a = check_conv(u_in, weight_in, sizes, in_widths, out_widths, grid, kernel_size, stride, padding,
                                has_cls, kConvFwdName);
  check_route(route, kConvFwdName);
  const bool onednn = use_onednn_conv(u_in, a, route);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain kernels on possibly grad-requiring inputs
  const at::Tensor u = u_in.contiguous();
  const int64_t B = u.size(0), L = a.im.geo.out_patches(), C = a.im.channels, kk = a.im.geo.taps();
  at::Tensor out = at::empty({B, L, a.co_max}, u.options());
  if (out.numel() == 0) return out;
  const auto acc = rsr_detail::acc_dtype(u.scalar_type());
  const at::Tensor w = weight_in.to(acc).contiguous();  // no copy for fp32 / fp64
  at::Tensor out2d = out.view({B * L, a.co_max});
  if (onednn) {
    for (int64_t g = 0; g < a.im.groups.num_groups(); ++g) {
      const int64_t s0 = a.im.groups.row_start[g], nb = a.im.groups.row_start[g + 1] - s0;
      const int64_t ci = a.im.groups.widths[g], co = a.out.widths[g];
      if (nb == 0) continue;
      at::Tensor rows = out2d.narrow(0, s0 * L, nb * L);
      if (co == 0 || ci == 0) {
        rows.zero_();
        continue;
      }
      onednn_conv_group(u, w, out2d, a.im.geo, C, s0, nb, ci, co);
      if (co < a.co_max) rows.narrow(1, co, a.co_max - co).zero_();
    }
    return out;
  }
  const int64_t max_rows = samples_per_block(L) * L;  // rows of the largest block: the block buffers' height
  const int64_t max_k = a.im.groups.max_width * kk, w_ld = C * kk, co_max = a.co_max;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), kConvFwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool same = std::is_same_v<acc_t, scalar_t>;
    const std::vector<scalar_t> zeros(static_cast<size_t>(std::max<int64_t>(C, 1)), static_cast<scalar_t>(0));
    Scratch<acc_t> buf(max_rows * max_k);
    Scratch<acc_t> tmp(same ? 0 : max_rows * co_max);  // fp16 / bf16: the fp32 product before its one rounding
    const acc_t* w_ptr = w.const_data_ptr<acc_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    for_each_block(a, [&](int64_t, int64_t ci, int64_t co, int64_t s0, int64_t nb) {
      const int64_t rows = nb * L, K = ci * kk;
      scalar_t* dst = out_ptr + s0 * L * co_max;
      if (co == 0 || K == 0) {  // no output channels, or an empty product
        std::fill(dst, dst + rows * co_max, static_cast<scalar_t>(0));
        return;
      }
      gather_block<scalar_t, acc_t>(u.const_data_ptr<scalar_t>(), zeros.data(), buf.get(), a.im.geo, C, s0, nb, ci);
      if constexpr (same) {
        // in place (the casts are identities: `if constexpr` does not discard inside the dispatch lambda)
        gemm<acc_t, acc_t>(false, true, rows, co, K, buf.get(), K, w_ptr, w_ld, 0, reinterpret_cast<acc_t*>(dst),
                           co_max);
      } else {
        gemm<acc_t, acc_t>(false, true, rows, co, K, buf.get(), K, w_ptr, w_ld, 0, tmp.get(), co);
        for (int64_t r = 0; r < rows; ++r)
          std::transform(tmp.get() + r * co, tmp.get() + (r + 1) * co, dst + r * co_max,
                         [](acc_t v) { return static_cast<scalar_t>(v); });  // one rounding to the output dtype
      }
      if (co < co_max)
        for (int64_t r = 0; r < rows; ++r) std::fill(dst + r * co_max + co, dst + (r + 1) * co_max, scalar_t(0));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> rsr_conv_bwd_cpu(const at::Tensor& dout_in, const at::Tensor& u_in,
                                                    const at::Tensor& weight_in, c10::IntArrayRef sizes,
                                                    const at::Tensor& in_widths, const at::Tensor& out_widths,
                                                    c10::IntArrayRef grid, int64_t kernel_size, int64_t stride,
                                                    int64_t padding, bool has_cls, c10::string_view route) {
  const ConvArgs a = check_conv(u_in, weight_in, sizes, in_widths, out_widths, grid, kernel_size, stride, padding,
                                has_cls, kConvBwdName);
  check_route(route, kConvBwdName);  // the backward is always the blocked path (see the top comment)
  const int64_t B = u_in.size(0), L = a.im.geo.out_patches(), N = a.im.geo.in_tokens(), C = a.im.channels;
  const int64_t kk = a.im.geo.taps();
  TORCH_CHECK(dout_in.defined() && dout_in.sizes() == c10::IntArrayRef({B, L, a.co_max}), kConvBwdName,
              ": dout must have shape (", B, ", ", L, ", ", a.co_max, "), got ",
              dout_in.defined() ? dout_in.sizes() : c10::IntArrayRef{});
  rsr_detail::check_same(dout_in, "dout", u_in, "u", kConvBwdName);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor u = u_in.contiguous(), dout = dout_in.contiguous();
  const auto acc = rsr_detail::acc_dtype(u.scalar_type());
  const at::Tensor w = weight_in.to(acc).contiguous();
  at::Tensor du = at::empty({B, N, C}, u.options());
  at::Tensor dw = at::zeros({a.co_max, C * kk}, u.options().dtype(acc));
  if (du.numel() == 0) return {du, dw};
  const int64_t max_rows = samples_per_block(L) * L;  // rows of the largest block: the block buffers' height
  const int64_t max_k = a.im.groups.max_width * kk, w_ld = C * kk, co_max = a.co_max;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), kConvBwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool same = std::is_same_v<acc_t, scalar_t>;
    const std::vector<scalar_t> zeros(static_cast<size_t>(std::max<int64_t>(C, 1)), static_cast<scalar_t>(0));
    Scratch<acc_t> buf(max_rows * max_k), dcols(max_rows * max_k);
    Scratch<acc_t> dy_buf(same ? 0 : max_rows * co_max);  // fp16 / bf16: dout's block in fp32
    const acc_t* w_ptr = w.const_data_ptr<acc_t>();
    acc_t* dw_ptr = dw.mutable_data_ptr<acc_t>();
    const scalar_t* dout_ptr = dout.const_data_ptr<scalar_t>();
    scalar_t* du_ptr = du.mutable_data_ptr<scalar_t>();
    for_each_block(a, [&](int64_t, int64_t ci, int64_t co, int64_t s0, int64_t nb) {
      const int64_t rows = nb * L, K = ci * kk;
      scalar_t* du_block = du_ptr + s0 * N * C;
      if (co == 0 || K == 0) {  // the group took no part in the conv: no gradient
        std::fill(du_block, du_block + nb * N * C, static_cast<scalar_t>(0));
        return;
      }
      gather_block<scalar_t, acc_t>(u.const_data_ptr<scalar_t>(), zeros.data(), buf.get(), a.im.geo, C, s0, nb, ci);
      const scalar_t* dout_block = dout_ptr + s0 * L * co_max;
      const acc_t* dy;
      int64_t dy_ld;
      if constexpr (same) {
        dy = reinterpret_cast<const acc_t*>(dout_block), dy_ld = co_max;  // an identity cast (see the forward)
      } else {
        for (int64_t r = 0; r < rows; ++r)
          std::transform(dout_block + r * co_max, dout_block + r * co_max + co, dy_buf.get() + r * co,
                         [](scalar_t v) { return static_cast<acc_t>(v); });
        dy = dy_buf.get(), dy_ld = co;
      }
      // dW[:co, :K] += dY^T cols (blocks and groups in a fixed order); dcols = dY W[:co, :K]
      gemm<acc_t, acc_t>(true, false, co, K, rows, dy, dy_ld, buf.get(), K, 1, dw_ptr, w_ld);
      gemm<acc_t, acc_t>(false, false, rows, K, co, dy, dy_ld, w_ptr, w_ld, 0, dcols.get(), K);
      const acc_t* dc_ptr = dcols.get();
      at::parallel_for(0, nb * N, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t begin,
                                                                                            int64_t end) {
        std::vector<const acc_t*> srcs;
        srcs.reserve(static_cast<size_t>(kk));
        for (int64_t r = begin; r < end; ++r) {
          const int64_t local = r / N, token = r % N;
          scalar_t* dst = du_block + r * C;
          if (token < a.im.geo.n_cls) {
            std::fill(dst, dst + C, static_cast<scalar_t>(0));
            continue;
          }
          const int64_t p = token - a.im.geo.n_cls;
          col2im_row<acc_t, scalar_t, acc_t>(dst, dc_ptr + local * L * K, a.im.geo, K, p / a.im.geo.W,
                                             p % a.im.geo.W, ci, C, srcs);
        }
      });
    });
  });
  return {du, dw};
}

}  // namespace resnas

TORCH_LIBRARY_IMPL(resnas, CPU, m) {
  m.impl("ext_rsr_conv_fwd", &resnas::rsr_conv_fwd_cpu);
  m.impl("ext_rsr_conv_bwd", &resnas::rsr_conv_bwd_cpu);
}
