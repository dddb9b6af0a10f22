// RSR token-layout im2col on CUDA: the CUDA implementations of resnas::ext_rsr_im2col_fwd / _bwd (schemas and
// semantics in ../rsr.h; the schema is defined by csrc/registration.cpp).
//
// Design and caveats:
// - Forward: one block per output token row; threads stride over its C*k*k columns, so the stores are coalesced and
//   each column's channel c = j / (k*k) is read from one of the k*k source token rows (cached in L1/L2).
// - Backward (col2im) is a gather, one block per input token row, one thread per channel: it sums the columns that
//   read the token in a fixed tap order. No atomics: deterministic.
// - Group sample ranges are passed by value in chunks of kRsrMaxGroupsPerLaunch (one launch per chunk with samples);
//   the widths are read from the int32 device tensor and clamped to C: no host read, no host-to-device copy.
// - Status: compiled by nvcc for sm_80 / sm_90 on a GPU-less machine; its tests (gpu marker) have not run on a GPU yet.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../rsr.h"

namespace resnas {
namespace {

constexpr const char* kFwdName = "ext_rsr_im2col_fwd";
constexpr const char* kBwdName = "ext_rsr_im2col_bwd";
constexpr int kThreads = 256;

struct Geo {  // RsrGeometry's fields, for device code
  int64_t H, W, Ho, Wo, k, stride, padding, n_cls;
};

inline Geo to_geo(const RsrGeometry& g) { return {g.H, g.W, g.Ho, g.Wo, g.k, g.stride, g.padding, g.n_cls}; }

template <typename scalar_t>
__global__ void im2col_fwd_kernel(const scalar_t* __restrict__ u, scalar_t* __restrict__ cols, RsrGroupChunk chunk,
                                  const int32_t* __restrict__ widths, Geo geo, int64_t C) {
  const int64_t L = geo.Ho * geo.Wo, kk = geo.k * geo.k, row_len = C * kk, N = geo.n_cls + geo.H * geo.W;
  const int64_t row = chunk.sample_begin * L + blockIdx.x;  // b * L + o
  const int64_t b = row / L, o = row % L, oh = o / geo.Wo, ow = o % geo.Wo;
  int ci, co;
  rsr_chunk_widths(chunk, b, widths, widths, C, C, ci, co);
  scalar_t* dst = cols + row * row_len;
  const scalar_t* src = u + (b * N + geo.n_cls) * C;
  for (int64_t j = threadIdx.x; j < row_len; j += blockDim.x) {
    const int64_t c = j / kk, tap = j - c * kk, kh = tap / geo.k, kw = tap - kh * geo.k;
    const int64_t ih = oh * geo.stride - geo.padding + kh, iw = ow * geo.stride - geo.padding + kw;
    scalar_t v = static_cast<scalar_t>(0);
    if (c < ci && ih >= 0 && ih < geo.H && iw >= 0 && iw < geo.W) v = src[(ih * geo.W + iw) * C + c];
    dst[j] = v;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void im2col_bwd_kernel(const scalar_t* __restrict__ dcols, scalar_t* __restrict__ du, RsrGroupChunk chunk,
                                  const int32_t* __restrict__ widths, Geo geo, int64_t C) {
  const int64_t L = geo.Ho * geo.Wo, kk = geo.k * geo.k, row_len = C * kk, N = geo.n_cls + geo.H * geo.W;
  const int64_t row = chunk.sample_begin * N + blockIdx.x;  // b * N + token
  const int64_t b = row / N, token = row % N;
  int ci, co;
  rsr_chunk_widths(chunk, b, widths, widths, C, C, ci, co);
  scalar_t* dst = du + row * C;
  const bool is_patch = token >= geo.n_cls;
  const int64_t p = is_patch ? token - geo.n_cls : 0, ih = p / geo.W, iw = p % geo.W;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t acc = 0;
    if (is_patch && c < ci) {
      for (int64_t kh = 0; kh < geo.k; ++kh) {  // fixed tap order: deterministic
        const int64_t ph = ih + geo.padding - kh;
        if (ph < 0 || ph % geo.stride != 0 || ph / geo.stride >= geo.Ho) continue;
        for (int64_t kw = 0; kw < geo.k; ++kw) {
          const int64_t pw = iw + geo.padding - kw;
          if (pw < 0 || pw % geo.stride != 0 || pw / geo.stride >= geo.Wo) continue;
          const int64_t o = (ph / geo.stride) * geo.Wo + pw / geo.stride;
          acc += static_cast<acc_t>(dcols[(b * L + o) * row_len + c * kk + kh * geo.k + kw]);
        }
      }
    }
    dst[c] = static_cast<scalar_t>(acc);
  }
}

}  // namespace

at::Tensor rsr_im2col_fwd_cuda(const at::Tensor& u_in, c10::IntArrayRef sizes, const at::Tensor& widths_in,
                               c10::IntArrayRef grid, int64_t kernel_size, int64_t stride, int64_t padding,
                               bool has_cls) {
  const auto args = rsr_detail::check_im2col_fwd(u_in, sizes, widths_in, grid, kernel_size, stride, padding, has_cls,
                                                 at::kCUDA, kFwdName);
  c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor u = u_in.contiguous(), widths = widths_in.contiguous();
  const int64_t B = u.size(0), C = args.channels, L = args.geo.out_patches();
  at::Tensor cols = at::empty({B, L, C * args.geo.taps()}, u.options());
  if (cols.numel() == 0) return cols;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Geo geo = to_geo(args.geo);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), kFwdName, [&] {
    for (const auto& chunk : rsr_group_chunks(args.groups)) {
      if (chunk.samples() == 0) continue;
      im2col_fwd_kernel<scalar_t><<<static_cast<unsigned>(chunk.samples() * L), kThreads, 0, stream>>>(
          u.const_data_ptr<scalar_t>(), cols.mutable_data_ptr<scalar_t>(), chunk, widths.const_data_ptr<int32_t>(), geo,
          C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return cols;
}

at::Tensor rsr_im2col_bwd_cuda(const at::Tensor& dcols_in, c10::IntArrayRef sizes, const at::Tensor& widths_in,
                               c10::IntArrayRef grid, int64_t kernel_size, int64_t stride, int64_t padding,
                               bool has_cls) {
  const auto args = rsr_detail::check_im2col_bwd(dcols_in, sizes, widths_in, grid, kernel_size, stride, padding,
                                                 has_cls, at::kCUDA, kBwdName);
  c10::cuda::CUDAGuard guard(dcols_in.device());
  const at::Tensor dcols = dcols_in.contiguous(), widths = widths_in.contiguous();
  const int64_t B = dcols.size(0), C = args.channels, N = args.geo.in_tokens();
  at::Tensor du = at::empty({B, N, C}, dcols.options());
  if (du.numel() == 0) return du;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Geo geo = to_geo(args.geo);
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (C + 31) / 32 * 32)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dcols.scalar_type(), kBwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (const auto& chunk : rsr_group_chunks(args.groups)) {
      if (chunk.samples() == 0) continue;
      im2col_bwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(chunk.samples() * N), threads, 0, stream>>>(
          dcols.const_data_ptr<scalar_t>(), du.mutable_data_ptr<scalar_t>(), chunk, widths.const_data_ptr<int32_t>(),
          geo, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return du;
}

}  // namespace resnas

TORCH_LIBRARY_IMPL(resnas, CUDA, m) {
  m.impl("ext_rsr_im2col_fwd", &resnas::rsr_im2col_fwd_cuda);
  m.impl("ext_rsr_im2col_bwd", &resnas::rsr_im2col_bwd_cuda);
}
