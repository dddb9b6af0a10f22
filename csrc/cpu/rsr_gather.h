// The token-layout im2col's row gathers on CPU, shared by the im2col kernels (rsr_im2col.cpp) and the conv that
// gathers the same columns block by block (rsr_conv.cpp). Layout and semantics: ../rsr.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../rsr.h"

namespace resnas {
namespace rsr_cpu {

// The k*k source rows of output token o of sample b (taps in (kh, kw) order); padding taps point at `zeros`.
template <typename scalar_t>
inline void row_sources(const scalar_t* u, const scalar_t* zeros, const RsrGeometry& geo, int64_t C, int64_t b,
                        int64_t o, const scalar_t** srcs) {
  const int64_t oh = o / geo.Wo, ow = o % geo.Wo;
  for (int64_t kh = 0; kh < geo.k; ++kh) {
    const int64_t ih = oh * geo.stride - geo.padding + kh;
    for (int64_t kw = 0; kw < geo.k; ++kw) {
      const int64_t iw = ow * geo.stride - geo.padding + kw;
      const bool inside = ih >= 0 && ih < geo.H && iw >= 0 && iw < geo.W;
      srcs[kh * geo.k + kw] = inside ? u + (b * geo.in_tokens() + geo.n_cls + ih * geo.W + iw) * C : zeros;
    }
  }
}

// dst[c * kk + tap] = srcs[tap][c] for c < ci, sequential stores; KK is compile-time for 3x3 (fully unrolled).
template <typename in_t, typename out_t, int KK>
inline void gather_row(out_t* dst, const in_t* const* srcs, int64_t ci, int64_t kk_rt) {
  const int64_t kk = KK > 0 ? KK : kk_rt;
  for (int64_t c = 0; c < ci; ++c) {
    out_t* d = dst + c * kk;
    if constexpr (KK > 0) {
#pragma GCC unroll 9
      for (int tap = 0; tap < KK; ++tap) d[tap] = static_cast<out_t>(srcs[tap][c]);
    } else {
      for (int64_t tap = 0; tap < kk; ++tap) d[tap] = static_cast<out_t>(srcs[tap][c]);
    }
  }
}

template <typename in_t, typename out_t>
inline void gather_row_any(out_t* dst, const in_t* const* srcs, int64_t ci, int64_t kk) {
  if (kk == 9) {
    gather_row<in_t, out_t, 9>(dst, srcs, ci, kk);
  } else {
    gather_row<in_t, out_t, 0>(dst, srcs, ci, kk);
  }
}

// col2im of one input token row: dst[c] = sum over the taps reading token (ih, iw), in (kh, kw) order, of
// dcols[o * row_len + c * kk + tap] for c < ci, zeros beyond (up to C). `dcols` points at the sample's first
// column row.
template <typename in_t, typename out_t, typename acc_t>
inline void col2im_row(out_t* dst, const in_t* dcols, const RsrGeometry& geo, int64_t row_len, int64_t ih, int64_t iw,
                       int64_t ci, int64_t C, std::vector<const in_t*>& srcs) {
  const int64_t kk = geo.taps();
  srcs.clear();
  for (int64_t kh = 0; kh < geo.k; ++kh) {
    const int64_t ph = ih + geo.padding - kh;  // = oh * stride for the output row oh that reads ih through kh
    if (ph < 0 || ph % geo.stride != 0 || ph / geo.stride >= geo.Ho) continue;
    for (int64_t kw = 0; kw < geo.k; ++kw) {
      const int64_t pw = iw + geo.padding - kw;
      if (pw < 0 || pw % geo.stride != 0 || pw / geo.stride >= geo.Wo) continue;
      const int64_t o = (ph / geo.stride) * geo.Wo + pw / geo.stride;
      srcs.push_back(dcols + o * row_len + kh * geo.k + kw);
    }
  }
  const int64_t n_src = static_cast<int64_t>(srcs.size());
  for (int64_t c = 0; c < ci; ++c) {
    acc_t acc = 0;
    for (int64_t s = 0; s < n_src; ++s) acc += static_cast<acc_t>(srcs[s][c * kk]);
    dst[c] = static_cast<out_t>(acc);
  }
  std::fill(dst + ci, dst + C, static_cast<out_t>(0));
}

}  // namespace rsr_cpu
}  // namespace resnas
