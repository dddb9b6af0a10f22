// Ragged LayerNorm on CPU: resnas::ext_ragged_layer_norm_fwd / _bwd (schema and semantics in ../ragged_layer_norm.h).
//
// Design and caveats:
// - Forward: rows are independent, so they are split over threads by at::parallel_for; each row loads its active
//   columns once into an fp32 (fp64 for fp64) buffer, then does mean, centred sums (corrected two-pass variance, as the
//   reference backend) and the affine write. Width-0 rows only write zeros. Inner loops are plain `#pragma omp simd` loops that
//   the compiler vectorises under -O3 -march=native (at::vec::Vectorized would fall back to its generic scalar
//   implementation here, as an extension is not compiled per CPU capability). fp16 / bf16 rows are converted to and
//   from fp32 by the row helpers below (bit tricks for bf16, F16C for fp16), as c10's per-element conversions do
//   not vectorise; fp32 / fp64 rows are read and written in place.
// - Backward: dweight/dbias must be bitwise reproducible whatever the thread count, so the rows are cut into fixed
//   chunks of kLayerNormBwdChunkRows rows; each chunk accumulates its own partial row (sequentially over its rows) and
//   the partials are summed in chunk order. Only the first max(widths) columns of the partials are materialised.
// - The simd reductions reassociate sums within a row (lane-wise partial sums), so results can differ from the
//   reference in the last bits; they do not depend on threads, as a row is always reduced by one thread.
// - weight/bias are converted once to the accumulation dtype (C_max elements, negligible next to the rows).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

#include "../ragged_layer_norm.h"

namespace resnas {
namespace {

constexpr const char* kFwdName = "ext_ragged_layer_norm_fwd";
constexpr const char* kBwdName = "ext_ragged_layer_norm_bwd";

template <typename scalar_t>
inline void fill_zero(scalar_t* dst, int64_t begin, int64_t end) {
  if (end > begin) std::fill(dst + begin, dst + end, static_cast<scalar_t>(0));
}

// ---- Storage <-> accumulation conversions of a row, written so that they vectorise. c10's own BFloat16 / Half
// conversions are scalar in a loop (a NaN branch, scalar F16C intrinsics), which made half-type rows ~2x slower.
template <typename T, typename acc_t>
inline void load_row(const T* src, acc_t* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]);
}

template <typename T, typename acc_t>
inline void store_row(const acc_t* src, T* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

// bf16 is the upper half of an fp32.
inline void load_row(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = static_cast<uint32_t>(bits[j]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    dst[j] = f;
  }
}

// Round to nearest even, NaN -> 0x7FC0: the same bits as c10::BFloat16(float), without the branch.
inline void store_row(const float* src, c10::BFloat16* dst, int64_t n) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    uint32_t u;
    std::memcpy(&u, &src[j], sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    bits[j] = src[j] != src[j] ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  }
}

// fp16 with F16C: 8 lanes per instruction, round to nearest even like c10::Half(float); scalar tail (and fallback).
inline void load_row(const c10::Half* src, float* dst, int64_t n) {
  int64_t j = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
#endif
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

inline void store_row(const float* src, c10::Half* dst, int64_t n) {
  int64_t j = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; j < n; ++j) dst[j] = static_cast<c10::Half>(src[j]);
}

// The row as acc_t: the row itself when it is stored as acc_t (fp32 / fp64), else a converted copy in `buf`.
template <typename T, typename acc_t>
inline const acc_t* row_as_acc(const T* src, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return src;
  } else {
    load_row(src, buf, n);
    return buf;
  }
}

// Where to compute an output row in acc_t: in place when it is stored as acc_t, else in `buf`, then flush_row().
template <typename T, typename acc_t>
inline acc_t* out_as_acc(T* dst, acc_t* buf) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename T, typename acc_t>
inline void flush_row(const acc_t* computed, T* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, acc_t>) store_row(computed, dst, n);
}

template <typename scalar_t, typename acc_t>
void fwd_kernel(const scalar_t* x, const scalar_t* residual, scalar_t* y, scalar_t* z, const acc_t* weight,
                const acc_t* bias, acc_t* mean_out, acc_t* rstd_out, int64_t C, const GroupTable& table, acc_t eps) {
  const int64_t rows = table.row_start.back();
  // Enough rows per task that thread start-up is amortised on small widths.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> staging(4 * static_cast<size_t>(C));  // acc_t copies of x, residual, z, y rows
    acc_t* x_buf = staging.data();
    acc_t* r_buf = x_buf + C;
    acc_t* z_buf = r_buf + C;
    acc_t* y_buf = z_buf + C;
    int64_t g = group_of(table, begin);
    for (int64_t row = begin; row < end; ++row) {
      while (row >= table.row_start[g + 1]) ++g;
      const int64_t width = table.widths[g];
      const int64_t off = row * C;
      scalar_t* y_row = y + off;
      scalar_t* z_row = z != nullptr ? z + off : nullptr;
      if (width == 0) {
        fill_zero(y_row, 0, C);
        if (z_row != nullptr) fill_zero(z_row, 0, C);
        mean_out[row] = 0;
        rstd_out[row] = 0;
        continue;
      }
      const acc_t* xa = row_as_acc(x + off, x_buf, width);
      const acc_t* v = xa;  // the normalised values: x, or z = x + residual as stored in scalar_t
      if (residual != nullptr) {
        const acc_t* ra = row_as_acc(residual + off, r_buf, width);
        acc_t* za = out_as_acc(z_row, z_buf);
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) za[j] = xa[j] + ra[j];
        flush_row(za, z_row, width);
        fill_zero(z_row, width, C);
        // Normalise z as stored (rounded to scalar_t), as unfused PyTorch and the spec do: the backward only sees the
        // stored z, and statistics of the unrounded sum blow up its rounding on near-constant rows (rstd ~ eps^-1/2).
        v = row_as_acc(static_cast<const scalar_t*>(z_row), z_buf, width);
      }
      const acc_t count = static_cast<acc_t>(width);
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < width; ++j) sum += v[j];
      const acc_t mu = sum / count;
      acc_t sq = 0, sd = 0;
#pragma omp simd reduction(+ : sq, sd)
      for (int64_t j = 0; j < width; ++j) {
        const acc_t d = v[j] - mu;
        sq += d * d;
        sd += d;
      }
      // Corrected two-pass statistics: `shift` is the rounding error of mu (see ops/ragged_layer_norm/__init__.py).
      const acc_t shift = sd / count;
      const acc_t var = std::max(sq / count - shift * shift, static_cast<acc_t>(0));
      const acc_t rs = static_cast<acc_t>(1) / std::sqrt(var + eps);
      acc_t* ya = out_as_acc(y_row, y_buf);
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) ya[j] = ((v[j] - mu) - shift) * rs * weight[j] + bias[j];
      flush_row(ya, y_row, width);
      fill_zero(y_row, width, C);
      mean_out[row] = mu;
      rstd_out[row] = rs;
    }
  });
}

template <typename scalar_t, typename acc_t>
void bwd_kernel(const scalar_t* dy, const scalar_t* dz, const scalar_t* z, const acc_t* weight, const acc_t* mean,
                const acc_t* rstd, scalar_t* dx, acc_t* dw_part, acc_t* db_part, int64_t C, int64_t part_cols,
                const GroupTable& table) {
  const int64_t rows = table.row_start.back();
  const int64_t chunks = (rows + kLayerNormBwdChunkRows - 1) / kLayerNormBwdChunkRows;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> staging(6 * static_cast<size_t>(C));
    acc_t* xhat = staging.data();
    acc_t* wdy = xhat + C;   // w * dy
    acc_t* z_buf = wdy + C;  // acc_t copies of the z, dy, dz, dx rows (half types only)
    acc_t* dy_buf = z_buf + C;
    acc_t* dz_buf = dy_buf + C;
    acc_t* dx_buf = dz_buf + C;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* dwp = dw_part + chunk * part_cols;
      acc_t* dbp = db_part + chunk * part_cols;
      std::fill(dwp, dwp + part_cols, static_cast<acc_t>(0));
      std::fill(dbp, dbp + part_cols, static_cast<acc_t>(0));
      const int64_t row_begin = chunk * kLayerNormBwdChunkRows;
      const int64_t row_end = std::min(rows, row_begin + kLayerNormBwdChunkRows);
      int64_t g = group_of(table, row_begin);
      for (int64_t row = row_begin; row < row_end; ++row) {
        while (row >= table.row_start[g + 1]) ++g;
        const int64_t width = table.widths[g];
        const int64_t off = row * C;
        scalar_t* dx_row = dx + off;
        if (width == 0) {  // the row did not take part: no gradient, nothing to the partials
          fill_zero(dx_row, 0, C);
          continue;
        }
        const acc_t* za = row_as_acc(z + off, z_buf, width);
        const acc_t* ga = row_as_acc(dy + off, dy_buf, width);
        const acc_t mu = mean[row];
        const acc_t rs = rstd[row];
        // w * dy is rounded once into a buffer and both summed and reused from there: were the sum contracted into
        // an FMA but the dx term not (or vice versa), c2 would not cancel w * dy exactly where it should (width 1,
        // constant rows), and the large rstd of such rows would blow the rounding difference up.
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          xhat[j] = (za[j] - mu) * rs;
          wdy[j] = weight[j] * ga[j];
        }
        acc_t s_x = 0, s_xw = 0, s_w = 0;  // sum(xhat), sum(xhat * w * dy), sum(w * dy) over the active columns
#pragma omp simd reduction(+ : s_x, s_xw, s_w)
        for (int64_t j = 0; j < width; ++j) {
          s_x += xhat[j];
          s_xw += xhat[j] * wdy[j];
          s_w += wdy[j];
        }
        const acc_t count = static_cast<acc_t>(width);
        // xhat re-centred on its computed mean, as the forward centres (ops/ragged_layer_norm/__init__.py).
        const acc_t shift = s_x / count;
        const acc_t c2 = s_w / count;
        const acc_t c1 = s_xw / count - shift * c2;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) xhat[j] -= shift;
        acc_t* dxa = out_as_acc(dx_row, dx_buf);
        if (dz != nullptr) {
          const acc_t* dza = row_as_acc(dz + off, dz_buf, width);
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) dxa[j] = (wdy[j] - (xhat[j] * c1 + c2)) * rs + dza[j];
        } else {
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) dxa[j] = (wdy[j] - (xhat[j] * c1 + c2)) * rs;
        }
        flush_row(dxa, dx_row, width);
        fill_zero(dx_row, width, C);
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          dwp[j] += ga[j] * xhat[j];
          dbp[j] += ga[j];
        }
      }
    }
  });
}

// out[c] = sum over chunks k, in increasing k, of part[k][c]: the order is fixed per column, so the split of the
// columns over threads does not change a bit.
template <typename acc_t>
void sum_partials(const acc_t* part, int64_t chunks, int64_t cols, acc_t* out) {
  at::parallel_for(0, cols, 256, [&](int64_t c0, int64_t c1) {
    std::fill(out + c0, out + c1, static_cast<acc_t>(0));
    for (int64_t k = 0; k < chunks; ++k) {
      const acc_t* p = part + k * cols;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) out[c] += p[c];
    }
  });
}

}  // namespace

// t itself when it already has `dtype`: Tensor::to would return it too, but through a dispatcher call, and a small
// supernet step makes hundreds of these.
static at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

LayerNormFwdOut ragged_layer_norm_fwd_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in,
                                          const at::Tensor& weight, const at::Tensor& bias,
                                          c10::IntArrayRef row_counts, const at::Tensor& widths, double eps) {
  detail::check_fwd_args(x_in, residual_in, weight, bias, eps, at::kCPU, kFwdName);
  // Reads and checks the widths: a CPU tensor costs no sync, so bad values get an error rather than a clamp.
  const GroupTable table = make_group_table(row_counts, widths, x_in.size(0), x_in.size(1), kFwdName, "x");
  const bool has_residual = residual_in.has_value() && residual_in->defined();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor residual = has_residual ? residual_in->contiguous() : at::Tensor();
  const int64_t rows = x.size(0), C = x.size(1);
  const auto stats = acc_dtype(x.scalar_type());
  at::Tensor y = at::empty({rows, C}, x.options());
  at::Tensor z = has_residual ? at::empty({rows, C}, x.options()) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rows}, x.options().dtype(stats));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(stats));
  if (rows == 0) return {y, z, mean, rstd};
  const at::Tensor w = as_dtype(weight, stats).contiguous();
  const at::Tensor b = as_dtype(bias, stats).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kFwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fwd_kernel<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(),
                                has_residual ? residual.const_data_ptr<scalar_t>() : nullptr,
                                y.mutable_data_ptr<scalar_t>(), has_residual ? z.mutable_data_ptr<scalar_t>() : nullptr,
                                w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), mean.mutable_data_ptr<acc_t>(),
                                rstd.mutable_data_ptr<acc_t>(), C, table, static_cast<acc_t>(eps));
  });
  return {y, z, mean, rstd};
}

LayerNormBwdOut ragged_layer_norm_bwd_cpu(const at::Tensor& dy_in, const std::optional<at::Tensor>& dz_in,
                                          const at::Tensor& z_in, const at::Tensor& weight, const at::Tensor& mean_in,
                                          const at::Tensor& rstd_in, c10::IntArrayRef row_counts,
                                          const at::Tensor& widths) {
  detail::check_bwd_args(dy_in, dz_in, z_in, weight, mean_in, rstd_in, at::kCPU, kBwdName);
  const GroupTable table = make_group_table(row_counts, widths, z_in.size(0), z_in.size(1), kBwdName, "z");
  const bool has_dz = dz_in.has_value() && dz_in->defined();
  const at::Tensor z = z_in.contiguous(), dy = dy_in.contiguous();
  const at::Tensor dz = has_dz ? dz_in->contiguous() : at::Tensor();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t rows = z.size(0), C = z.size(1);
  const auto stats = acc_dtype(z.scalar_type());
  at::Tensor dx = at::empty({rows, C}, z.options());
  at::Tensor dw = at::empty({C}, z.options().dtype(stats));
  at::Tensor db = at::empty({C}, z.options().dtype(stats));
  const int64_t part_cols = rows > 0 ? table.max_width : 0;  // columns beyond every width get no gradient
  AT_DISPATCH_FLOATING_TYPES(stats, kBwdName, [&] {  // what no partial sum writes (a raw fill: no extra op call)
    std::fill(dw.mutable_data_ptr<scalar_t>() + part_cols, dw.mutable_data_ptr<scalar_t>() + C, scalar_t(0));
    std::fill(db.mutable_data_ptr<scalar_t>() + part_cols, db.mutable_data_ptr<scalar_t>() + C, scalar_t(0));
  });
  const int64_t chunks = (rows + kLayerNormBwdChunkRows - 1) / kLayerNormBwdChunkRows;
  if (rows > 0) {
    const at::Tensor w = as_dtype(weight, stats).contiguous();
    at::Tensor parts = at::empty({2, chunks, part_cols}, z.options().dtype(stats));  // dw's, then db's partials
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), kBwdName, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      acc_t* dw_part = parts.mutable_data_ptr<acc_t>();
      acc_t* db_part = dw_part + chunks * part_cols;
      bwd_kernel<scalar_t, acc_t>(dy.const_data_ptr<scalar_t>(), has_dz ? dz.const_data_ptr<scalar_t>() : nullptr,
                                  z.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(),
                                  rstd.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(), dw_part, db_part,
                                  C, part_cols, table);
      if (part_cols > 0) {
        sum_partials<acc_t>(dw_part, chunks, part_cols, dw.mutable_data_ptr<acc_t>());
        sum_partials<acc_t>(db_part, chunks, part_cols, db.mutable_data_ptr<acc_t>());
      }
    });
  }
  return {dx, as_dtype(dw, weight.scalar_type()), as_dtype(db, weight.scalar_type())};
}

}  // namespace resnas

TORCH_LIBRARY_IMPL(resnas, CPU, m) {
  m.impl("ext_ragged_layer_norm_fwd", &resnas::ragged_layer_norm_fwd_cpu);
  m.impl("ext_ragged_layer_norm_bwd", &resnas::ragged_layer_norm_bwd_cpu);
}
