// RSR token-layout im2col on CPU: resnas::ext_rsr_im2col_fwd / _bwd (schemas and semantics in ../rsr.h).
//
// Design and caveats:
// - Forward: one task per output token row (b, oh, ow). For each of the k*k taps the source is one contiguous input
//   token row (or the conv's zero padding), copied with stride k*k into the channel-major / tap-minor column layout;
//   the row is ~ci*k*k elements, so the strided writes stay within L1. Columns beyond ci*k*k are zero-filled (the
//   ragged contract), so no uninitialised memory reaches the GEMM.
// - Backward is col2im as a gather: one task per input token row; each of its channels sums, in a fixed tap order,
//   the (at most ceil(k/s)^2) columns that read it. No scatter, no atomics: deterministic whatever the threads.
// - The cls row (has_cls) is not read by the conv: its gradient is zero here.
// - Accumulation in fp32 (fp64 for fp64); the forward is a pure copy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../rsr.h"

namespace resnas {
namespace {

constexpr const char* kFwdName = "ext_rsr_im2col_fwd";
constexpr const char* kBwdName = "ext_rsr_im2col_bwd";

// Group owning `sample`: the last g with row_start[g] <= sample (skips empty groups).
inline int64_t group_of(const GroupTable& table, int64_t sample) {
  auto it = std::upper_bound(table.row_start.begin(), table.row_start.end(), sample);
  return static_cast<int64_t>(it - table.row_start.begin()) - 1;
}

template <typename scalar_t>
void im2col_fwd_kernel(const scalar_t* u, scalar_t* cols, const RsrGeometry& geo, const GroupTable& groups,
                       int64_t C) {
  const int64_t L = geo.out_patches(), N = geo.in_tokens(), kk = geo.taps(), row_len = C * kk;
  const int64_t rows = groups.row_start.back() * L;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(row_len, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / L, o = row % L, oh = o / geo.Wo, ow = o % geo.Wo;
      const int64_t ci = groups.widths[group_of(groups, b)];
      scalar_t* dst = cols + row * row_len;
      for (int64_t kh = 0; kh < geo.k; ++kh) {
        const int64_t ih = oh * geo.stride - geo.padding + kh;
        for (int64_t kw = 0; kw < geo.k; ++kw) {
          const int64_t iw = ow * geo.stride - geo.padding + kw;
          const int64_t tap = kh * geo.k + kw;
          if (ih < 0 || ih >= geo.H || iw < 0 || iw >= geo.W) {
            for (int64_t c = 0; c < ci; ++c) dst[c * kk + tap] = static_cast<scalar_t>(0);
            continue;
          }
          const scalar_t* src = u + (b * N + geo.n_cls + ih * geo.W + iw) * C;
          for (int64_t c = 0; c < ci; ++c) dst[c * kk + tap] = src[c];
        }
      }
      std::fill(dst + ci * kk, dst + row_len, static_cast<scalar_t>(0));
    }
  });
}

template <typename scalar_t, typename acc_t>
void im2col_bwd_kernel(const scalar_t* dcols, scalar_t* du, const RsrGeometry& geo, const GroupTable& groups,
                       int64_t C) {
  const int64_t L = geo.out_patches(), N = geo.in_tokens(), kk = geo.taps(), row_len = C * kk;
  const int64_t rows = groups.row_start.back() * N;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C * 4, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> srcs;  // for each tap reading this token: &dcols[b, o, tap] (then + c * kk)
    srcs.reserve(static_cast<size_t>(kk));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N, token = row % N;
      scalar_t* dst = du + row * C;
      const int64_t ci = groups.widths[group_of(groups, b)];
      if (token < geo.n_cls || ci == 0) {
        std::fill(dst, dst + C, static_cast<scalar_t>(0));
        continue;
      }
      const int64_t ih = (token - geo.n_cls) / geo.W, iw = (token - geo.n_cls) % geo.W;
      srcs.clear();
      // Taps in increasing (kh, kw): the fixed summation order.
      for (int64_t kh = 0; kh < geo.k; ++kh) {
        const int64_t ph = ih + geo.padding - kh;  // = oh * stride for the output row oh that reads ih via kh
        if (ph < 0 || ph % geo.stride != 0 || ph / geo.stride >= geo.Ho) continue;
        for (int64_t kw = 0; kw < geo.k; ++kw) {
          const int64_t pw = iw + geo.padding - kw;
          if (pw < 0 || pw % geo.stride != 0 || pw / geo.stride >= geo.Wo) continue;
          const int64_t o = (ph / geo.stride) * geo.Wo + pw / geo.stride;
          srcs.push_back(dcols + (b * L + o) * row_len + kh * geo.k + kw);
        }
      }
      const int64_t n_src = static_cast<int64_t>(srcs.size());
      for (int64_t c = 0; c < ci; ++c) {
        acc_t acc = 0;
        for (int64_t s = 0; s < n_src; ++s) acc += static_cast<acc_t>(srcs[s][c * kk]);
        dst[c] = static_cast<scalar_t>(acc);
      }
      std::fill(dst + ci, dst + C, static_cast<scalar_t>(0));
    }
  });
}

}  // namespace

at::Tensor rsr_im2col_fwd_cpu(const at::Tensor& u_in, c10::IntArrayRef sizes, c10::IntArrayRef widths,
                              c10::IntArrayRef grid, int64_t kernel_size, int64_t stride, int64_t padding,
                              bool has_cls) {
  const auto args = rsr_detail::check_im2col_fwd(u_in, sizes, widths, grid, kernel_size, stride, padding, has_cls,
                                                 at::kCPU, kFwdName);
  const at::Tensor u = u_in.contiguous();
  const int64_t B = u.size(0), C = args.channels;
  at::Tensor cols = at::empty({B, args.geo.out_patches(), C * args.geo.taps()}, u.options());
  if (cols.numel() == 0) return cols;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), kFwdName, [&] {
    im2col_fwd_kernel<scalar_t>(u.const_data_ptr<scalar_t>(), cols.mutable_data_ptr<scalar_t>(), args.geo,
                                args.groups, C);
  });
  return cols;
}

at::Tensor rsr_im2col_bwd_cpu(const at::Tensor& dcols_in, c10::IntArrayRef sizes, c10::IntArrayRef widths,
                              c10::IntArrayRef grid, int64_t kernel_size, int64_t stride, int64_t padding,
                              bool has_cls) {
  const auto args = rsr_detail::check_im2col_bwd(dcols_in, sizes, widths, grid, kernel_size, stride, padding,
                                                 has_cls, at::kCPU, kBwdName);
  const at::Tensor dcols = dcols_in.contiguous();
  const int64_t B = dcols.size(0), C = args.channels;
  at::Tensor du = at::empty({B, args.geo.in_tokens(), C}, dcols.options());
  if (du.numel() == 0) return du;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dcols.scalar_type(), kBwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    im2col_bwd_kernel<scalar_t, acc_t>(dcols.const_data_ptr<scalar_t>(), du.mutable_data_ptr<scalar_t>(), args.geo,
                                       args.groups, C);
  });
  return du;
}

}  // namespace resnas

TORCH_LIBRARY_FRAGMENT(resnas, m) {
  m.def(
      "ext_rsr_im2col_fwd(Tensor u, int[] sizes, int[] widths, int[] grid, int kernel_size, int stride, "
      "int padding, bool has_cls) -> Tensor");
  m.def(
      "ext_rsr_im2col_bwd(Tensor dcols, int[] sizes, int[] widths, int[] grid, int kernel_size, int stride, "
      "int padding, bool has_cls) -> Tensor");
}

TORCH_LIBRARY_IMPL(resnas, CPU, m) {
  m.impl("ext_rsr_im2col_fwd", &resnas::rsr_im2col_fwd_cpu);
  m.impl("ext_rsr_im2col_bwd", &resnas::rsr_im2col_bwd_cpu);
}
