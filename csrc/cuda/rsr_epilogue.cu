// RSR pooling epilogue on CUDA: the CUDA implementations of resnas::ext_rsr_epilogue_fwd / _bwd (schemas and
// semantics in ../rsr.h; the schema is defined by csrc/registration.cpp).
//
// Design and caveats:
// - Forward: one block per output row, one thread per channel (coalesced): conv + bias + pos_embed + the pooling
//   window's raw tokens / count for c < ci, zeros beyond co; the cls row adds cls_bias and the raw cls token.
// - Backward: (1) one block per output row: dconv / dcls (masked copies) and dx of the row's pooling window (windows
//   are disjoint, so each dx row has exactly one writer) or of the cls token; (2) column sums over the batch, one
//   thread per (output token, channel) visiting the samples in increasing order (chunks of groups accumulate in
//   launch order); (3) dconv_bias: one thread per channel summing the per-token sums in token order. No atomics
//   anywhere: parameter gradients are bitwise reproducible.
// - Group sample ranges are passed by value in chunks of kRsrMaxGroupsPerLaunch; the widths are read from the int32
//   device tensors and clamped to Ci / Co: no host read, no host-to-device copy, graph-capturable.
// - Status: compiled by nvcc for sm_80 / sm_90 on a GPU-less machine; its tests (gpu marker) have not run on a GPU yet.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../rsr.h"

namespace resnas {
namespace {

constexpr const char* kFwdName = "ext_rsr_epilogue_fwd";
constexpr const char* kBwdName = "ext_rsr_epilogue_bwd";
constexpr int kThreads = 256;

struct Geo {
  int64_t H, W, Ho, Wo, stride, n_cls, ci_max, co_max;
};

// Token count of the pooling window of output patch t (a window cut by the grid's edge counts only inner tokens).
__device__ __forceinline__ int64_t window_count(const Geo& g, int64_t h0, int64_t w0) {
  return (min(h0 + g.stride, g.H) - h0) * (min(w0 + g.stride, g.W) - w0);
}

template <typename scalar_t, typename acc_t>
__global__ void epilogue_fwd_kernel(const scalar_t* __restrict__ conv, const scalar_t* __restrict__ x,
                                    const acc_t* __restrict__ pos, const acc_t* __restrict__ bias,
                                    const scalar_t* __restrict__ cls, const acc_t* __restrict__ cls_bias,
                                    scalar_t* __restrict__ out, RsrGroupChunk chunk,
                                    const int32_t* __restrict__ in_widths, const int32_t* __restrict__ out_widths,
                                    Geo g) {
  const int64_t L = g.Ho * g.Wo, n_out = g.n_cls + L, n_in = g.n_cls + g.H * g.W;
  const int64_t row = chunk.sample_begin * n_out + blockIdx.x;
  const int64_t b = row / n_out, r = row % n_out;
  int ci, co;
  rsr_chunk_widths(chunk, b, in_widths, out_widths, g.ci_max, g.co_max, ci, co);
  scalar_t* dst = out + row * g.co_max;
  const scalar_t* xs = x + b * n_in * g.ci_max;
  if (r < g.n_cls) {
    const scalar_t* src = cls + b * g.co_max;
    for (int64_t c = threadIdx.x; c < g.co_max; c += blockDim.x) {
      acc_t v = 0;
      if (c < co) v = static_cast<acc_t>(src[c]) + cls_bias[c] + (c < ci ? static_cast<acc_t>(xs[c]) : acc_t(0));
      dst[c] = static_cast<scalar_t>(v);
    }
    return;
  }
  const int64_t t = r - g.n_cls, h0 = (t / g.Wo) * g.stride, w0 = (t % g.Wo) * g.stride;
  const int64_t h1 = min(h0 + g.stride, g.H), w1 = min(w0 + g.stride, g.W);
  const acc_t count = static_cast<acc_t>(window_count(g, h0, w0));
  const scalar_t* src = conv + (b * L + t) * g.co_max;
  const acc_t* pos_t = pos + t * g.co_max;
  for (int64_t c = threadIdx.x; c < g.co_max; c += blockDim.x) {
    acc_t v = 0;
    if (c < co) {
      v = static_cast<acc_t>(src[c]) + bias[c] + pos_t[c];
      if (c < ci) {
        acc_t pooled = 0;
        for (int64_t ih = h0; ih < h1; ++ih)
          for (int64_t iw = w0; iw < w1; ++iw)
            pooled += static_cast<acc_t>(xs[(g.n_cls + ih * g.W + iw) * g.ci_max + c]);
        v += pooled / count;
      }
    }
    dst[c] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void epilogue_bwd_rows_kernel(const scalar_t* __restrict__ dout, scalar_t* __restrict__ dconv,
                                         scalar_t* __restrict__ dx, scalar_t* __restrict__ dcls, RsrGroupChunk chunk,
                                         const int32_t* __restrict__ in_widths,
                                         const int32_t* __restrict__ out_widths, Geo g) {
  const int64_t L = g.Ho * g.Wo, n_out = g.n_cls + L, n_in = g.n_cls + g.H * g.W;
  const int64_t row = chunk.sample_begin * n_out + blockIdx.x;
  const int64_t b = row / n_out, r = row % n_out;
  int ci, co;
  rsr_chunk_widths(chunk, b, in_widths, out_widths, g.ci_max, g.co_max, ci, co);
  const scalar_t* src = dout + row * g.co_max;
  scalar_t* dxs = dx + b * n_in * g.ci_max;
  const scalar_t zero = static_cast<scalar_t>(0);
  if (r < g.n_cls) {
    for (int64_t c = threadIdx.x; c < g.co_max; c += blockDim.x) {
      const scalar_t d = c < co ? src[c] : zero;
      dcls[b * g.co_max + c] = d;
      if (c < g.ci_max) dxs[c] = c < ci ? d : zero;
    }
    return;
  }
  const int64_t t = r - g.n_cls, h0 = (t / g.Wo) * g.stride, w0 = (t % g.Wo) * g.stride;
  const int64_t h1 = min(h0 + g.stride, g.H), w1 = min(w0 + g.stride, g.W);
  const acc_t count = static_cast<acc_t>(window_count(g, h0, w0));
  scalar_t* dc = dconv + (b * L + t) * g.co_max;
  for (int64_t c = threadIdx.x; c < g.co_max; c += blockDim.x) {
    const scalar_t d = c < co ? src[c] : zero;
    dc[c] = d;
    if (c < g.ci_max) {
      const scalar_t share = c < ci ? static_cast<scalar_t>(static_cast<acc_t>(d) / count) : zero;
      for (int64_t ih = h0; ih < h1; ++ih)
        for (int64_t iw = w0; iw < w1; ++iw) dxs[(g.n_cls + ih * g.W + iw) * g.ci_max + c] = share;
    }
  }
}

// sums[r, c] (+)= sum over the chunk's samples b, in increasing order, of dout[b, r, c] for c < co_b.
template <typename scalar_t, typename acc_t>
__global__ void epilogue_colsum_kernel(const scalar_t* __restrict__ dout, acc_t* __restrict__ sums,
                                       RsrGroupChunk chunk, const int32_t* __restrict__ out_widths, int64_t n_out,
                                       int64_t co_max, bool accumulate) {
  const int64_t r = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= co_max) return;
  acc_t acc = accumulate ? sums[r * co_max + c] : acc_t(0);
  int64_t b = chunk.sample_begin;
  for (int g = 0; g < chunk.count; ++g) {
    const int64_t end = chunk.sample_end[g];
    if (c < rsr_clamped_width(out_widths, chunk.group_begin + g, co_max)) {
      for (; b < end; ++b) acc += static_cast<acc_t>(dout[(b * n_out + r) * co_max + c]);
    }
    b = end;
  }
  sums[r * co_max + c] = acc;
}

// dbias[c] = sum over output patches t (in order) of sums[n_cls + t, c].
template <typename acc_t>
__global__ void epilogue_bias_kernel(const acc_t* __restrict__ sums, acc_t* __restrict__ dbias, int64_t first,
                                     int64_t L, int64_t co_max) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= co_max) return;
  acc_t acc = 0;
  for (int64_t t = 0; t < L; ++t) acc += sums[(first + t) * co_max + c];
  dbias[c] = acc;
}

Geo to_geo(const rsr_detail::EpilogueArgs& a) {
  return {a.geo.H, a.geo.W, a.geo.Ho, a.geo.Wo, a.geo.stride, a.geo.n_cls, a.ci_max, a.co_max};
}

int row_threads(int64_t width) {
  return static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (width + 31) / 32 * 32)));
}

}  // namespace

at::Tensor rsr_epilogue_fwd_cuda(const at::Tensor& conv_in, const at::Tensor& x_in, const at::Tensor& pos_embed,
                                 const at::Tensor& conv_bias, const std::optional<at::Tensor>& cls_in,
                                 const std::optional<at::Tensor>& cls_bias, c10::IntArrayRef sizes,
                                 const at::Tensor& in_widths_in, const at::Tensor& out_widths_in,
                                 c10::IntArrayRef grid, int64_t stride) {
  const auto args = rsr_detail::check_epilogue_fwd(conv_in, x_in, pos_embed, conv_bias, cls_in, cls_bias, sizes,
                                                   in_widths_in, out_widths_in, grid, stride, at::kCUDA, kFwdName);
  c10::cuda::CUDAGuard guard(x_in.device());
  const bool has_cls = args.geo.n_cls == 1;
  const at::Tensor conv = conv_in.contiguous(), x = x_in.contiguous();
  const at::Tensor in_widths = in_widths_in.contiguous(), out_widths = out_widths_in.contiguous();
  const at::Tensor cls = has_cls ? cls_in->contiguous() : at::Tensor();
  const int64_t B = x.size(0), n_out = args.geo.n_cls + args.geo.out_patches();
  at::Tensor out = at::empty({B, n_out, args.co_max}, x.options());
  if (out.numel() == 0) return out;
  const auto acc = rsr_detail::acc_dtype(x.scalar_type());
  const at::Tensor pos = pos_embed.to(acc).contiguous(), bias = conv_bias.to(acc).contiguous();
  const at::Tensor cbias = has_cls ? cls_bias->to(acc).contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Geo g = to_geo(args);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kFwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (const auto& chunk : rsr_group_chunks(args.groups.in)) {
      if (chunk.samples() == 0) continue;
      epilogue_fwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(chunk.samples() * n_out), row_threads(g.co_max), 0,
                                              stream>>>(
          conv.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), pos.const_data_ptr<acc_t>(),
          bias.const_data_ptr<acc_t>(), has_cls ? cls.const_data_ptr<scalar_t>() : nullptr,
          has_cls ? cbias.const_data_ptr<acc_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), chunk,
          in_widths.const_data_ptr<int32_t>(), out_widths.const_data_ptr<int32_t>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

RsrEpilogueBwdOut rsr_epilogue_bwd_cuda(const at::Tensor& dout_in, c10::IntArrayRef sizes,
                                        const at::Tensor& in_widths_in, const at::Tensor& out_widths_in,
                                        c10::IntArrayRef grid, int64_t stride,
                                        bool has_cls, int64_t in_channels) {
  const auto args = rsr_detail::check_epilogue_bwd(dout_in, sizes, in_widths_in, out_widths_in, grid, stride,
                                                   has_cls, in_channels, at::kCUDA, kBwdName);
  c10::cuda::CUDAGuard guard(dout_in.device());
  const at::Tensor dout = dout_in.contiguous();
  const at::Tensor in_widths = in_widths_in.contiguous(), out_widths = out_widths_in.contiguous();
  const int64_t B = dout.size(0), L = args.geo.out_patches(), n = args.geo.n_cls, Co = args.co_max;
  const int64_t n_out = n + L;
  const auto acc = rsr_detail::acc_dtype(dout.scalar_type());
  at::Tensor dconv = at::empty({B, L, Co}, dout.options());
  at::Tensor dx = at::empty({B, args.geo.in_tokens(), args.ci_max}, dout.options());
  at::Tensor dcls = has_cls ? at::empty({B, 1, Co}, dout.options()) : at::empty({0}, dout.options());
  at::Tensor sums = at::zeros({n_out, Co}, dout.options().dtype(acc));
  at::Tensor dbias = at::empty({Co}, dout.options().dtype(acc));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Geo g = to_geo(args);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dout.scalar_type(), kBwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bool accumulate = false;
    for (const auto& chunk : rsr_group_chunks(args.groups.in)) {
      if (chunk.samples() == 0) continue;
      epilogue_bwd_rows_kernel<scalar_t, acc_t><<<static_cast<unsigned>(chunk.samples() * n_out), row_threads(Co), 0,
                                                  stream>>>(
          dout.const_data_ptr<scalar_t>(), dconv.mutable_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
          has_cls ? dcls.mutable_data_ptr<scalar_t>() : nullptr, chunk, in_widths.const_data_ptr<int32_t>(),
          out_widths.const_data_ptr<int32_t>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const dim3 blocks(static_cast<unsigned>(n_out), static_cast<unsigned>((Co + kThreads - 1) / kThreads));
      epilogue_colsum_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          dout.const_data_ptr<scalar_t>(), sums.mutable_data_ptr<acc_t>(), chunk, out_widths.const_data_ptr<int32_t>(),
          n_out, Co, accumulate);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      accumulate = true;
    }
    if (Co > 0) {
      epilogue_bias_kernel<acc_t><<<static_cast<unsigned>((Co + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          sums.const_data_ptr<acc_t>(), dbias.mutable_data_ptr<acc_t>(), n, L, Co);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  at::Tensor dpos = sums.narrow(0, n, L).unsqueeze(0).clone();  // a fresh tensor: no storage offset
  at::Tensor dcls_bias = has_cls ? sums[0].clone() : at::empty({0}, dout.options().dtype(acc));
  return {dconv, dx, dpos, dbias, dcls, dcls_bias};
}

}  // namespace resnas

TORCH_LIBRARY_IMPL(resnas, CUDA, m) {
  m.impl("ext_rsr_epilogue_fwd", &resnas::rsr_epilogue_fwd_cuda);
  m.impl("ext_rsr_epilogue_bwd", &resnas::rsr_epilogue_bwd_cuda);
}
