// RSR pooling epilogue on CPU: resnas::ext_rsr_epilogue_fwd / _bwd (schemas and semantics in ../rsr.h).
//
// Design and caveats:
// - Forward: one pass over the output, one task per output row (b, token). A patch row sums its pooling window of raw
//   x rows (only the first ci channels; the zero padding to co is implicit) into an fp32 (fp64) buffer, then writes
//   conv + bias + pos_embed + window / count for c < co and zeros beyond. The cls row adds cls_bias and the raw cls
//   token. Partial windows at odd grids divide by the number of tokens inside the grid (AvgPool2d, ceil_mode=True).
// - Backward, deterministic by construction: dconv / dcls / dx are row-local (each input token lies in exactly one
//   pooling window, so dx is a gather); the parameter gradients are column sums over the batch, computed per output
//   token (task) with the samples visited in increasing order, and dconv_bias sums those per-token sums in token
//   order. Thread count never changes a bit.
// - Parameter gradients are returned in fp32 (fp64 for fp64 dout); the Python side casts them to the parameter dtype.
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

constexpr const char* kFwdName = "ext_rsr_epilogue_fwd";
constexpr const char* kBwdName = "ext_rsr_epilogue_bwd";

template <typename scalar_t>
inline void fill_zero(scalar_t* dst, int64_t begin, int64_t end) {
  if (end > begin) std::fill(dst + begin, dst + end, static_cast<scalar_t>(0));
}

// Pooling window of output patch t: rows [h0, h1) x cols [w0, w1) of the input grid.
struct Window {
  int64_t h0, h1, w0, w1;
  int64_t count() const { return (h1 - h0) * (w1 - w0); }
};

inline Window window_of(const RsrGeometry& geo, int64_t t) {
  const int64_t oh = t / geo.Wo, ow = t % geo.Wo;
  const int64_t h0 = oh * geo.stride, w0 = ow * geo.stride;
  return {h0, std::min(h0 + geo.stride, geo.H), w0, std::min(w0 + geo.stride, geo.W)};
}

template <typename scalar_t, typename acc_t>
void epilogue_fwd_kernel(const scalar_t* conv, const scalar_t* x, const acc_t* pos, const acc_t* bias,
                         const scalar_t* cls, const acc_t* cls_bias, scalar_t* out, const RsrGeometry& geo,
                         const rsr_detail::RsrGroups& groups, int64_t ci_max, int64_t co_max) {
  const int64_t L = geo.out_patches(), N_in = geo.in_tokens(), N_out = geo.n_cls + L;
  const int64_t rows = groups.in.row_start.back() * N_out;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(co_max, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> pooled(static_cast<size_t>(std::max<int64_t>(ci_max, 1)));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N_out, r = row % N_out;
      const int64_t g = group_of(groups.in, b);
      const int64_t ci = groups.in.widths[g], co = groups.out.widths[g];
      scalar_t* dst = out + row * co_max;
      const scalar_t* x_sample = x + b * N_in * ci_max;
      if (r < geo.n_cls) {  // cls row: linear output + cls_bias + raw cls token
        const scalar_t* src = cls + b * co_max;
        for (int64_t c = 0; c < ci; ++c)
          dst[c] = static_cast<scalar_t>(static_cast<acc_t>(src[c]) + cls_bias[c] + static_cast<acc_t>(x_sample[c]));
        for (int64_t c = ci; c < co; ++c) dst[c] = static_cast<scalar_t>(static_cast<acc_t>(src[c]) + cls_bias[c]);
        fill_zero(dst, co, co_max);
        continue;
      }
      const int64_t t = r - geo.n_cls;
      const scalar_t* src = conv + (b * L + t) * co_max;
      const acc_t* pos_t = pos + t * co_max;
      if (ci > 0) {
        const Window win = window_of(geo, t);
        std::fill(pooled.begin(), pooled.begin() + ci, static_cast<acc_t>(0));
        for (int64_t ih = win.h0; ih < win.h1; ++ih) {
          for (int64_t iw = win.w0; iw < win.w1; ++iw) {
            const scalar_t* xr = x_sample + (geo.n_cls + ih * geo.W + iw) * ci_max;
#pragma omp simd
            for (int64_t c = 0; c < ci; ++c) pooled[c] += static_cast<acc_t>(xr[c]);
          }
        }
        const acc_t count = static_cast<acc_t>(win.count());
#pragma omp simd
        for (int64_t c = 0; c < ci; ++c)
          dst[c] = static_cast<scalar_t>(static_cast<acc_t>(src[c]) + bias[c] + pos_t[c] + pooled[c] / count);
      }
#pragma omp simd
      for (int64_t c = ci; c < co; ++c)
        dst[c] = static_cast<scalar_t>(static_cast<acc_t>(src[c]) + bias[c] + pos_t[c]);
      fill_zero(dst, co, co_max);
    }
  });
}

template <typename scalar_t, typename acc_t>
void epilogue_bwd_kernel(const scalar_t* dout, scalar_t* dconv, scalar_t* dx, scalar_t* dcls, acc_t* row_sums,
                         const RsrGeometry& geo, const rsr_detail::RsrGroups& groups, int64_t ci_max,
                         int64_t co_max) {
  const int64_t B = groups.in.row_start.back();
  const int64_t L = geo.out_patches(), N_in = geo.in_tokens(), N_out = geo.n_cls + L;
  // 1. dconv / dcls: dout's rows masked to co.
  const int64_t out_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(co_max, 1));
  at::parallel_for(0, B * N_out, out_grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N_out, r = row % N_out;
      const int64_t co = groups.out.widths[group_of(groups.out, b)];
      const scalar_t* src = dout + row * co_max;
      scalar_t* dst = r < geo.n_cls ? dcls + b * co_max : dconv + (b * L + r - geo.n_cls) * co_max;
      std::copy(src, src + co, dst);
      fill_zero(dst, co, co_max);
    }
  });
  // 2. dx: each input token takes dout of its pooling window / count (or of the cls row), first ci channels.
  const int64_t in_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(ci_max, 1));
  at::parallel_for(0, B * N_in, in_grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N_in, token = row % N_in;
      const int64_t ci = groups.in.widths[group_of(groups.in, b)];
      scalar_t* dst = dx + row * ci_max;
      if (token < geo.n_cls) {
        std::copy(dout + b * N_out * co_max, dout + b * N_out * co_max + ci, dst);
      } else {
        const int64_t ih = (token - geo.n_cls) / geo.W, iw = (token - geo.n_cls) % geo.W;
        const int64_t t = (ih / geo.stride) * geo.Wo + iw / geo.stride;
        const acc_t count = static_cast<acc_t>(window_of(geo, t).count());
        const scalar_t* src = dout + (b * N_out + geo.n_cls + t) * co_max;
#pragma omp simd
        for (int64_t c = 0; c < ci; ++c) dst[c] = static_cast<scalar_t>(static_cast<acc_t>(src[c]) / count);
      }
      fill_zero(dst, ci, ci_max);
    }
  });
  // 3. Column sums of dout over the batch, one output token per task, samples in increasing order.
  at::parallel_for(0, N_out, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t* acc = row_sums + r * co_max;
      std::fill(acc, acc + co_max, static_cast<acc_t>(0));
      for (int64_t g = 0; g < groups.out.num_groups(); ++g) {
        const int64_t co = groups.out.widths[g];
        for (int64_t b = groups.out.row_start[g]; b < groups.out.row_start[g + 1]; ++b) {
          const scalar_t* src = dout + (b * N_out + r) * co_max;
#pragma omp simd
          for (int64_t c = 0; c < co; ++c) acc[c] += static_cast<acc_t>(src[c]);
        }
      }
    }
  });
}

}  // namespace

at::Tensor rsr_epilogue_fwd_cpu(const at::Tensor& conv_in, const at::Tensor& x_in, const at::Tensor& pos_embed,
                                const at::Tensor& conv_bias, const std::optional<at::Tensor>& cls_in,
                                const std::optional<at::Tensor>& cls_bias, c10::IntArrayRef sizes,
                                const at::Tensor& in_widths, const at::Tensor& out_widths, c10::IntArrayRef grid,
                                int64_t stride) {
  const auto args = rsr_detail::check_epilogue_fwd(conv_in, x_in, pos_embed, conv_bias, cls_in, cls_bias, sizes,
                                                   in_widths, out_widths, grid, stride, at::kCPU, kFwdName);
  const bool has_cls = args.geo.n_cls == 1;
  const at::Tensor conv = conv_in.contiguous(), x = x_in.contiguous();
  const at::Tensor cls = has_cls ? cls_in->contiguous() : at::Tensor();
  const int64_t B = x.size(0);
  at::Tensor out = at::empty({B, args.geo.n_cls + args.geo.out_patches(), args.co_max}, x.options());
  if (out.numel() == 0) return out;
  const auto acc = rsr_detail::acc_dtype(x.scalar_type());
  // Parameters once in the accumulation dtype: (L + 2) * Co elements, negligible next to the activations.
  const at::Tensor pos = pos_embed.to(acc).contiguous(), bias = conv_bias.to(acc).contiguous();
  const at::Tensor cbias = has_cls ? cls_bias->to(acc).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kFwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    epilogue_fwd_kernel<scalar_t, acc_t>(conv.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                         pos.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>(),
                                         has_cls ? cls.const_data_ptr<scalar_t>() : nullptr,
                                         has_cls ? cbias.const_data_ptr<acc_t>() : nullptr,
                                         out.mutable_data_ptr<scalar_t>(), args.geo, args.groups, args.ci_max,
                                         args.co_max);
  });
  return out;
}

RsrEpilogueBwdOut rsr_epilogue_bwd_cpu(const at::Tensor& dout_in, c10::IntArrayRef sizes, const at::Tensor& in_widths,
                                       const at::Tensor& out_widths, c10::IntArrayRef grid, int64_t stride,
                                       bool has_cls, int64_t in_channels) {
  const auto args = rsr_detail::check_epilogue_bwd(dout_in, sizes, in_widths, out_widths, grid, stride, has_cls,
                                                   in_channels, at::kCPU, kBwdName);
  const at::Tensor dout = dout_in.contiguous();
  const int64_t B = dout.size(0), L = args.geo.out_patches(), n = args.geo.n_cls, Co = args.co_max;
  const auto acc = rsr_detail::acc_dtype(dout.scalar_type());
  at::Tensor dconv = at::empty({B, L, Co}, dout.options());
  at::Tensor dx = at::empty({B, args.geo.in_tokens(), args.ci_max}, dout.options());
  at::Tensor dcls = has_cls ? at::empty({B, 1, Co}, dout.options()) : at::empty({0}, dout.options());
  at::Tensor row_sums = at::empty({n + L, Co}, dout.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dout.scalar_type(), kBwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    epilogue_bwd_kernel<scalar_t, acc_t>(dout.const_data_ptr<scalar_t>(), dconv.mutable_data_ptr<scalar_t>(),
                                         dx.mutable_data_ptr<scalar_t>(),
                                         has_cls ? dcls.mutable_data_ptr<scalar_t>() : nullptr,
                                         row_sums.mutable_data_ptr<acc_t>(), args.geo, args.groups, args.ci_max, Co);
  });
  at::Tensor dpos = row_sums.narrow(0, n, L).unsqueeze(0).clone();  // a fresh tensor: no storage offset
  // dconv_bias[c] = sum over output tokens (in token order) of the per-token batch sums: at::sum over a fixed CPU
  // tensor would also be deterministic, but an explicit loop keeps the order independent of ATen's reduction strategy.
  at::Tensor dbias = at::zeros({Co}, dout.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "rsr_epilogue_dbias", [&] {
    const scalar_t* sums = row_sums.const_data_ptr<scalar_t>() + n * Co;
    scalar_t* db = dbias.mutable_data_ptr<scalar_t>();
    for (int64_t t = 0; t < L; ++t)
      for (int64_t c = 0; c < Co; ++c) db[c] += sums[t * Co + c];
  });
  at::Tensor dcls_bias = has_cls ? row_sums[0].clone() : at::empty({0}, dout.options().dtype(acc));
  return {dconv, dx, dpos, dbias, dcls, dcls_bias};
}

}  // namespace resnas

TORCH_LIBRARY_IMPL(resnas, CPU, m) {
  m.impl("ext_rsr_epilogue_fwd", &resnas::rsr_epilogue_fwd_cpu);
  m.impl("ext_rsr_epilogue_bwd", &resnas::rsr_epilogue_bwd_cpu);
}
