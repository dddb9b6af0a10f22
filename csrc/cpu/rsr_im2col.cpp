// RSR token-layout im2col on CPU: resnas::ext_rsr_im2col_fwd / _bwd (schemas and semantics in ../rsr.h). The conv
// built on the same gathers is rsr_conv.cpp.
//
// Design and caveats:
// - im2col forward: one task per output token row (b, oh, ow). Each of the k*k taps reads one contiguous input token
//   row (or a row of zeros for the conv's padding); the row is written channel-outer / tap-inner, i.e. sequentially,
//   in the channel-major / tap-minor column layout (3x3 unrolled at compile time). Columns beyond ci*k*k are
//   zero-filled (the ragged contract), so no uninitialised memory reaches a GEMM.
// - im2col backward is col2im as a gather: one task per input token row; each of its channels sums, in a fixed tap
//   order, the (at most ceil(k/s)^2) columns that read it. No scatter, no atomics: deterministic whatever the threads.
//   The cls row (has_cls) is not read by the conv: its gradient is zero.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "rsr_gather.h"

namespace resnas {
namespace {

using rsr_cpu::col2im_row;
using rsr_cpu::gather_row_any;
using rsr_cpu::row_sources;

constexpr const char* kFwdName = "ext_rsr_im2col_fwd";
constexpr const char* kBwdName = "ext_rsr_im2col_bwd";

template <typename scalar_t>
void im2col_fwd_kernel(const scalar_t* u, scalar_t* cols, const RsrGeometry& geo, const GroupTable& groups,
                       int64_t C) {
  const int64_t L = geo.out_patches(), kk = geo.taps(), row_len = C * kk;
  const int64_t rows = groups.row_start.back() * L;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(row_len, 1));
  const std::vector<scalar_t> zeros(static_cast<size_t>(std::max<int64_t>(C, 1)), static_cast<scalar_t>(0));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> srcs(static_cast<size_t>(kk));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / L;
      const int64_t ci = groups.widths[group_of(groups, b)];
      scalar_t* dst = cols + row * row_len;
      row_sources(u, zeros.data(), geo, C, b, row % L, srcs.data());
      gather_row_any(dst, srcs.data(), ci, kk);
      std::fill(dst + ci * kk, dst + row_len, static_cast<scalar_t>(0));
    }
  });
}

template <typename scalar_t, typename acc_t>
void im2col_bwd_kernel(const scalar_t* dcols, scalar_t* du, const RsrGeometry& geo, const GroupTable& groups,
                       int64_t C) {
  const int64_t L = geo.out_patches(), N = geo.in_tokens(), row_len = C * geo.taps();
  const int64_t rows = groups.row_start.back() * N;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C * 4, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> srcs;
    srcs.reserve(static_cast<size_t>(geo.taps()));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N, token = row % N;
      scalar_t* dst = du + row * C;
      const int64_t ci = groups.widths[group_of(groups, b)];
      if (token < geo.n_cls) {
        std::fill(dst, dst + C, static_cast<scalar_t>(0));
        continue;
      }
      const int64_t p = token - geo.n_cls;
      col2im_row<scalar_t, scalar_t, acc_t>(dst, dcols + b * L * row_len, geo, row_len, p / geo.W, p % geo.W, ci, C,
                                            srcs);
    }
  });
}

}  // namespace

at::Tensor rsr_im2col_fwd_cpu(const at::Tensor& u_in, c10::IntArrayRef sizes, const at::Tensor& widths,
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

at::Tensor rsr_im2col_bwd_cpu(const at::Tensor& dcols_in, c10::IntArrayRef sizes, const at::Tensor& widths,
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

TORCH_LIBRARY_IMPL(resnas, CPU, m) {
  m.impl("ext_rsr_im2col_fwd", &resnas::rsr_im2col_fwd_cpu);
  m.impl("ext_rsr_im2col_bwd", &resnas::rsr_im2col_bwd_cpu);
}
