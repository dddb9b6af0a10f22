// Ragged (variable-width) linear on CPU: resnas::ext_ragged_linear_fwd / _bwd.
//
// Schema (semantics: `_reference_fwd` / `_reference_bwd` in resnas_kernels/ops/ragged_linear.py):
//   ext_ragged_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor? row_scale,
//                         int[] row_counts, int[] in_widths, int[] out_widths, int segments, int rows_per_sample,
//                         bool gelu, bool save_pre) -> (Tensor y, Tensor pre)
//   ext_ragged_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor? pre, Tensor? row_scale, int[] row_counts,
//                         int[] in_widths, int[] out_widths, int segments, int rows_per_sample, bool gelu,
//                         bool has_bias, bool has_residual) -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dres)
//   x: (rows, K_max); weight: (N_max, K_max) viewed as `segments` blocks of Nseg = N_max / segments rows; group g owns
//   row_counts[g] consecutive rows, reads x[:, :k_g] and, in each segment s, weight[s*Nseg : s*Nseg + n_g, :k_g].
//   y: (rows, N_max), zero beyond n_g in every segment; pre = x W^T + b (GELU input) when save_pre, else (0,).
//
// Design and caveats:
// - Forward: per group and segment one BLAS call (at::mm_out) on strided views: x.narrow(cols), W.narrow(rows/cols)
//   and the output narrowed to the group's rows and active columns (row stride N_max). ATen hands such views to BLAS
//   with their leading dimensions, so the weight is never copied. Then ONE parallel pass over the group's rows applies
//   the whole epilogue (bias, save pre, exact GELU, row scale, residual) and writes the zeros beyond n_g.
// - Exact GELU for fp32 / half types uses an erfc approximation written to vectorise under `omp simd` (std::erf
//   does not, and was ~15x slower here): Numerical Recipes' Chebyshev erfc (fractional error < 1.2e-7) with a
//   Cody-Waite exp; |error| of gelu(x) <= ~1.1e-7 * max(1, |x|). fp64 uses std::erf / std::exp (gradcheck).
// - Backward: a ragged prologue pass (only with a residual, row scale or GELU) writes dresidual (dy on the active
//   columns, 0 elsewhere) and dpre = dy * row_scale * gelu'(pre); dx per group = sum over segments of dpre_s @ W_s
//   (mm_out then addmm_out into the strided dx view), zeros beyond k_g.
// - dW is accumulated group by group, segment by segment, in a fixed order, into its top-left slices with
//   addmm_out on strided views (fp32 / fp64). For fp16 / bf16 each group's product is formed by BLAS in the input
//   dtype and added to an fp32 accumulator (one rounding per group). db is a column sum written by hand: each
//   column is summed by one thread over the rows in order, so db does not depend on the thread count. The BLAS
//   reduction over rows (dW) is deterministic run to run; MKL/oneDNN do not promise bit-equality across thread
//   counts.
// - One op boundary per call: everything above runs inside one dispatcher call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "../ragged.h"

namespace resnas {
namespace {

constexpr const char* kFwdName = "ext_ragged_linear_fwd";
constexpr const char* kBwdName = "ext_ragged_linear_bwd";

// ---------------------------------------------------------------------------------------------------------------------
// Exact GELU and its derivative. Float versions are branch-light and inline so that `omp simd` loops vectorise.
// ---------------------------------------------------------------------------------------------------------------------
// exp(v) for v <= ~0: Cody-Waite reduction v = n ln2 + r, |r| <= ln2 / 2, degree-7 Taylor polynomial, 2^n built from
// its exponent bits. Flushed to 0 (well, 2^-126-ish) below -87: callers only need it for erfc tails and Gaussians.
inline float exp_nonpositive(float v) {
  v = v < -87.0f ? -87.0f : v;
  const float n = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const float r = (v - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// erfc(z) for z >= 0, fractional error < 1.2e-7 (Press et al., Numerical Recipes, "erfcc").
inline float erfc_nonnegative(float z) {
  const float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  return t * exp_nonpositive(p - z * z);
}

// 2 * Phi(h) = 1 + erf(h / sqrt 2), without cancellation for negative h.
inline float two_phi(float h) {
  const float u = h * 0.70710678118654752f;
  const float e = erfc_nonnegative(u < 0.0f ? -u : u);
  return u < 0.0f ? e : 2.0f - e;
}

inline float gelu(float h) { return 0.5f * h * two_phi(h); }
inline float gelu_grad(float h) {  // Phi(h) + h * phi(h)
  return 0.5f * two_phi(h) + h * exp_nonpositive(-0.5f * h * h) * 0.39894228040143268f;
}
inline double gelu(double h) { return 0.5 * h * (1.0 + std::erf(h * 0.70710678118654752)); }
inline double gelu_grad(double h) {
  return 0.5 * (1.0 + std::erf(h * 0.70710678118654752)) + h * std::exp(-0.5 * h * h) * 0.39894228040143268;
}

// ---------------------------------------------------------------------------------------------------------------------
// Argument checks (the Python op checks too; these guard direct torch.ops calls)
// ---------------------------------------------------------------------------------------------------------------------
bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_matrix(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(is_float(t.scalar_type()), op, ": ", name, " must be float32/float64/float16/bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

struct Layout {
  GroupTable in;   // rows and k_g
  GroupTable out;  // rows and n_g
  int64_t rows, k_max, n_max, segments, seg_width, rows_per_sample;
};

Layout check_layout(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef row_counts,
                    c10::IntArrayRef in_widths, c10::IntArrayRef out_widths, int64_t segments, int64_t rows_per_sample,
                    const std::optional<at::Tensor>& row_scale, const char* op) {
  check_matrix(x, "x", op);
  check_matrix(weight, "weight", op);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight must have shape (N_max, ", x.size(1),
              ") (K_max = x.size(1)), got ", weight.sizes());
  TORCH_CHECK(segments >= 1 && weight.size(0) % segments == 0, op, ": segments=", segments,
              " must be >= 1 and divide N_max = ", weight.size(0));
  TORCH_CHECK(rows_per_sample >= 1, op, ": rows_per_sample must be >= 1, got ", rows_per_sample);
  Layout l;
  l.rows = x.size(0);
  l.k_max = x.size(1);
  l.n_max = weight.size(0);
  l.segments = segments;
  l.seg_width = l.n_max / segments;
  l.rows_per_sample = rows_per_sample;
  l.in = make_group_table(row_counts, in_widths, l.rows, l.k_max, op, "x");
  l.out = make_group_table(row_counts, out_widths, l.rows, l.seg_width, op, "a weight segment (N_max / segments)");
  if (row_scale.has_value() && row_scale->defined()) {
    const at::Tensor& s = *row_scale;
    TORCH_CHECK(s.dim() == 1 && s.size(0) * rows_per_sample == l.rows, op, ": row_scale must have shape (",
                l.rows / rows_per_sample, ",) (one scale per sample), got ", s.sizes());
    TORCH_CHECK(s.scalar_type() == x.scalar_type() || s.scalar_type() == at::kFloat, op,
                ": row_scale must have x's dtype or float32, got ", s.scalar_type());
    TORCH_CHECK(s.device() == x.device(), op, ": row_scale must be on x's device");
  }
  return l;
}

void check_like(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
                const char* op) {
  if (!t.has_value() || !t->defined()) return;
  check_matrix(*t, name, op);
  TORCH_CHECK(t->sizes() == shape && t->scalar_type() == dtype, op, ": ", name, " must have shape ", shape,
              " and dtype ", dtype, ", got ", t->sizes(), " ", t->scalar_type());
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Per-sample scale as acc_t (row_scale is x's dtype or fp32): converted once, B values.
template <typename acc_t>
std::vector<acc_t> scales_of(const std::optional<at::Tensor>& row_scale) {
  if (!present(row_scale)) return {};
  const at::Tensor s = row_scale->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* p = s.const_data_ptr<acc_t>();
  return std::vector<acc_t>(p, p + s.numel());
}

// ---------------------------------------------------------------------------------------------------------------------
// Forward epilogue: one pass over a group's rows
// ---------------------------------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
void fwd_epilogue(const Layout& l, int64_t g, bool has_gemm, const scalar_t* gemm_out, const acc_t* bias,
                  const scalar_t* residual, const acc_t* scales, bool gelu_on, scalar_t* pre, scalar_t* y) {
  const int64_t row0 = l.in.row_start[g], row1 = l.in.row_start[g + 1];
  const int64_t n = l.out.widths[g], N = l.n_max, S = l.segments, seg = l.seg_width;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1));
  at::parallel_for(row0, row1, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(static_cast<size_t>(std::max<int64_t>(n, 1)));
    acc_t* v = buf.data();
    for (int64_t row = begin; row < end; ++row) {
      const acc_t rs = scales != nullptr ? scales[row / l.rows_per_sample] : acc_t(1);
      for (int64_t s = 0; s < S; ++s) {
        const int64_t off = row * N + s * seg;
        const acc_t* b = bias != nullptr ? bias + s * seg : nullptr;
        if (has_gemm) {
          const scalar_t* h = gemm_out + off;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) v[j] = static_cast<acc_t>(h[j]);
        } else {  // k_g = 0: the product is empty, only the bias remains
          std::fill(v, v + n, acc_t(0));
        }
        if (b != nullptr) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) v[j] += b[j];
        }
        if (pre != nullptr) {
          scalar_t* p = pre + off;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) p[j] = static_cast<scalar_t>(v[j]);
          std::fill(p + n, p + seg, scalar_t(0));
        }
        if (gelu_on) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) v[j] = gelu(v[j]);
        }
        scalar_t* out = y + off;
        if (residual != nullptr) {
          const scalar_t* r = residual + off;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>(static_cast<acc_t>(r[j]) + rs * v[j]);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>(v[j]);
        }
        std::fill(out + n, out + seg, scalar_t(0));  // the contract: exactly zero beyond n_g, residual or not
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------------
// Backward prologue: dresidual (masked dy) and dpre = dy * row_scale * gelu'(pre) on the active columns
// ---------------------------------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
void bwd_prologue(const Layout& l, const scalar_t* dy, const scalar_t* pre, const acc_t* scales, scalar_t* dres,
                  scalar_t* dpre) {
  const int64_t N = l.n_max, S = l.segments, seg = l.seg_width;
  for (int64_t g = 0; g < l.in.num_groups(); ++g) {
    const int64_t n = l.out.widths[g];
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1));
    at::parallel_for(l.in.row_start[g], l.in.row_start[g + 1], grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const acc_t rs = scales != nullptr ? scales[row / l.rows_per_sample] : acc_t(1);
        for (int64_t s = 0; s < S; ++s) {
          const int64_t off = row * N + s * seg;
          const scalar_t* d = dy + off;
          if (dres != nullptr) {
            scalar_t* r = dres + off;
            std::copy(d, d + n, r);
            std::fill(r + n, r + seg, scalar_t(0));
          }
          if (dpre == nullptr) continue;
          scalar_t* out = dpre + off;  // only [0, n) is ever read back
          if (pre != nullptr) {
            const scalar_t* h = pre + off;
#pragma omp simd
            for (int64_t j = 0; j < n; ++j)
              out[j] = static_cast<scalar_t>(static_cast<acc_t>(d[j]) * rs * gelu_grad(static_cast<acc_t>(h[j])));
          } else {
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>(static_cast<acc_t>(d[j]) * rs);
          }
        }
      }
    });
  }
}

// db[c] = sum over groups g (in order) and their rows (in order) of dpre[row, c], for c % seg < n_g. Each column is
// summed by one thread, so the result does not depend on the thread count; the running sums are fp64, so summing
// thousands of rows one after the other loses nothing next to the fp32 pairwise sums of the reference.
template <typename scalar_t>
void bias_grad(const Layout& l, const scalar_t* dpre, double* db) {
  const int64_t N = l.n_max, seg = l.seg_width;
  at::parallel_for(0, N, 64, [&](int64_t c0, int64_t c1) {
    std::fill(db + c0, db + c1, 0.0);
    for (int64_t g = 0; g < l.in.num_groups(); ++g) {
      const int64_t n = l.out.widths[g];
      for (int64_t s = 0; s < l.segments; ++s) {
        const int64_t lo = std::max(c0, s * seg), hi = std::min(c1, s * seg + n);
        if (lo >= hi) continue;
        for (int64_t row = l.in.row_start[g]; row < l.in.row_start[g + 1]; ++row) {
          const scalar_t* d = dpre + row * N;
#pragma omp simd
          for (int64_t c = lo; c < hi; ++c) db[c] += static_cast<double>(d[c]);
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ragged_linear_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& row_scale,
    c10::IntArrayRef row_counts, c10::IntArrayRef in_widths, c10::IntArrayRef out_widths, int64_t segments,
    int64_t rows_per_sample, bool gelu_on, bool save_pre) {
  const Layout l = check_layout(x, weight, row_counts, in_widths, out_widths, segments, rows_per_sample, row_scale,
                                kFwdName);
  if (present(bias)) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == l.n_max && bias->scalar_type() == x.scalar_type() &&
                    bias->device() == x.device(),
                kFwdName, ": bias must be a (", l.n_max, ",) ", x.scalar_type(), " tensor on x's device, got ",
                bias->sizes(), " ", bias->scalar_type());
  }
  check_like(residual, "residual", {l.rows, l.n_max}, x.scalar_type(), kFwdName);
  TORCH_CHECK(!present(row_scale) || present(residual), kFwdName, ": row_scale needs a residual");

  at::Tensor y = at::empty({l.rows, l.n_max}, x.options());
  at::Tensor pre = save_pre ? at::empty({l.rows, l.n_max}, x.options()) : at::empty({0}, x.options());
  at::Tensor gemm_out = save_pre ? pre : y;  // the GEMM writes the pre-activation buffer when it is kept, else y
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kFwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor b = present(bias) ? bias->to(acc_type).contiguous() : at::Tensor();  // N_max values, once
    const std::vector<acc_t> scales = scales_of<acc_t>(row_scale);
    for (int64_t g = 0; g < l.in.num_groups(); ++g) {
      const int64_t rows = l.in.rows(g), k = l.in.widths[g], n = l.out.widths[g];
      if (rows == 0) continue;
      const int64_t row0 = l.in.row_start[g];
      const bool has_gemm = k > 0 && n > 0;
      if (has_gemm) {
        const at::Tensor xg = x.narrow(0, row0, rows).narrow(1, 0, k);
        for (int64_t s = 0; s < l.segments; ++s) {
          at::Tensor out = gemm_out.narrow(0, row0, rows).narrow(1, s * l.seg_width, n);
          at::mm_out(out, xg, weight.narrow(0, s * l.seg_width, n).narrow(1, 0, k).t());
        }
      }
      fwd_epilogue<scalar_t, acc_t>(l, g, has_gemm, gemm_out.const_data_ptr<scalar_t>(),
                                    b.defined() ? b.const_data_ptr<acc_t>() : nullptr,
                                    present(residual) ? residual->const_data_ptr<scalar_t>() : nullptr,
                                    scales.empty() ? nullptr : scales.data(), gelu_on,
                                    save_pre ? pre.mutable_data_ptr<scalar_t>() : nullptr,
                                    y.mutable_data_ptr<scalar_t>());
    }
  });
  return {y, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ragged_linear_bwd_cpu(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& pre,
    const std::optional<at::Tensor>& row_scale, c10::IntArrayRef row_counts, c10::IntArrayRef in_widths,
    c10::IntArrayRef out_widths, int64_t segments, int64_t rows_per_sample, bool gelu_on, bool has_bias,
    bool has_residual) {
  const Layout l = check_layout(x, weight, row_counts, in_widths, out_widths, segments, rows_per_sample, row_scale,
                                kBwdName);
  const at::Tensor dy = dy_in.contiguous();
  check_like(dy, "dy", {l.rows, l.n_max}, x.scalar_type(), kBwdName);
  TORCH_CHECK(!gelu_on || present(pre), kBwdName, ": gelu=True needs the saved pre-activation `pre`");
  if (gelu_on) check_like(pre, "pre", {l.rows, l.n_max}, x.scalar_type(), kBwdName);

  const bool write_dpre = gelu_on || present(row_scale);
  const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  at::Tensor dres = has_residual ? at::empty({l.rows, l.n_max}, x.options()) : at::empty({0}, x.options());
  at::Tensor dpre_buf = write_dpre ? at::empty({l.rows, l.n_max}, x.options()) : at::Tensor();
  at::Tensor dx = at::empty({l.rows, l.k_max}, x.options());
  at::Tensor dw = at::zeros({l.n_max, l.k_max}, x.options().dtype(half ? acc_type : x.scalar_type()));
  at::Tensor db = at::empty({has_bias ? l.n_max : 0}, x.options().dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kBwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> scales = scales_of<acc_t>(row_scale);
    if (has_residual || write_dpre) {
      bwd_prologue<scalar_t, acc_t>(l, dy.const_data_ptr<scalar_t>(),
                                    gelu_on ? pre->const_data_ptr<scalar_t>() : nullptr,
                                    scales.empty() ? nullptr : scales.data(),
                                    has_residual ? dres.mutable_data_ptr<scalar_t>() : nullptr,
                                    write_dpre ? dpre_buf.mutable_data_ptr<scalar_t>() : nullptr);
    }
    // dpre: the prologue's buffer, or dy itself (read only through views of the active columns).
    const at::Tensor dpre = write_dpre ? dpre_buf : dy;
    for (int64_t g = 0; g < l.in.num_groups(); ++g) {
      const int64_t rows = l.in.rows(g), k = l.in.widths[g], n = l.out.widths[g];
      if (rows == 0) continue;
      const int64_t row0 = l.in.row_start[g];
      at::Tensor dxg = dx.narrow(0, row0, rows);
      if (k > 0 && n > 0) {
        const at::Tensor xg = x.narrow(0, row0, rows).narrow(1, 0, k);
        at::Tensor dxk = dxg.narrow(1, 0, k);
        for (int64_t s = 0; s < l.segments; ++s) {
          const at::Tensor dps = dpre.narrow(0, row0, rows).narrow(1, s * l.seg_width, n);
          const at::Tensor ws = weight.narrow(0, s * l.seg_width, n).narrow(1, 0, k);
          if (s == 0) {
            at::mm_out(dxk, dps, ws);
          } else {
            at::addmm_out(dxk, dxk, dps, ws);
          }
          // dW[s*Nseg : s*Nseg + n, :k] += dpre_s^T x_g, groups and segments in a fixed order.
          at::Tensor dws = dw.narrow(0, s * l.seg_width, n).narrow(1, 0, k);
          if (half) {
            dws.add_(at::mm(dps.t(), xg));
          } else {
            at::addmm_out(dws, dws, dps.t(), xg);
          }
        }
        if (k < l.k_max) dxg.narrow(1, k, l.k_max - k).zero_();
      } else {
        dxg.zero_();  // no product: x gets no gradient from this group
      }
    }
    if (has_bias && l.rows > 0) {
      bias_grad<scalar_t>(l, dpre.const_data_ptr<scalar_t>(), db.mutable_data_ptr<double>());
    } else if (has_bias) {
      db.zero_();
    }
  });
  return {dx, dw.to(weight.scalar_type()), db.to(weight.scalar_type()), dres};
}

}  // namespace resnas

TORCH_LIBRARY_FRAGMENT(resnas, m) {
  m.def(
      "ext_ragged_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor? row_scale, "
      "int[] row_counts, int[] in_widths, int[] out_widths, int segments, int rows_per_sample, bool gelu, "
      "bool save_pre) -> (Tensor, Tensor)");
  m.def(
      "ext_ragged_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor? pre, Tensor? row_scale, int[] row_counts, "
      "int[] in_widths, int[] out_widths, int segments, int rows_per_sample, bool gelu, bool has_bias, "
      "bool has_residual) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(resnas, CPU, m) {
  m.impl("ext_ragged_linear_fwd", &resnas::ragged_linear_fwd_cpu);
  m.impl("ext_ragged_linear_bwd", &resnas::ragged_linear_bwd_cpu);
}
