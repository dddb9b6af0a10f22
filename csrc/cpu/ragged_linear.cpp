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
// - No weight copies: every GEMM is one BLAS call (at::mm_out / addmm_out) on strided views: x.narrow(cols),
//   W.narrow(rows / cols) and the output narrowed to the block's rows and active columns (row stride N_max). ATen
//   hands such views to BLAS with their leading dimensions.
// - Scheduling: each phase is ONE parallel region over tasks; the threads claim tasks from a shared counter, most
//   expensive first, and the BLAS calls inside run single-threaded (BLAS does not nest inside an OpenMP region).
//   Versus multithreaded BLAS per group, the threads do not synchronise once per small GEMM (which on a shared or
//   oversubscribed machine cost more than the GEMMs), each block's epilogue runs while its GEMM output is hot, and a
//   thread slowed by another process simply claims fewer tasks. Tasks are fixed by the shapes and own their outputs,
//   so results do not depend on the schedule or the thread count.
// - Forward, per tile (group, row block of 256..1024 rows, the group's rows cut into equal parts; a wide single-segment
//   output also in column parts with taller row blocks, `fwd_tasks`): mm_out per segment (one call over all segments
//   for a group of full segment width) into the output (or the pre-activation buffer when it is kept), then the whole
//   epilogue (bias, save pre, exact GELU, row scale, residual) and the zeros beyond n_g.
//   Without GELU / residual / saved pre (fp32 / fp64), addmm_out writes y with the bias folded in and only the tails
//   beyond n_g are written after it (no epilogue pass).
// - Exact GELU for fp32 / half types uses an erfc approximation written to vectorise under `omp simd` (std::erf
//   does not, and was ~15x slower here): Numerical Recipes' Chebyshev erfc (fractional error < 1.2e-7) with a
//   Cody-Waite exp; |error| of gelu(x) <= ~1.1e-7 * max(1, |x|). fp64 uses std::erf / std::exp (gradcheck).
// - Backward prologue (only with a residual, row scale or GELU): dresidual (dy on the active columns, 0 elsewhere) and
//   dpre = dy * row_scale * gelu'(pre), formed block by block in scratch memory, never as a rows x N_max buffer.
//   dx = sum over segments of dpre_s @ W_s (mm_out then addmm_out into the strided dx view), zeros beyond k_g.
//   Two ways to get dW / db, both deterministic and independent of the thread count (no atomics; every sum has an
//   order fixed by the shapes):
//   * fused (W of <= kFusedMaxWeight elements, fp32 / fp64; the S1 layers): the rows are cut into <= 16 chunks; a
//     chunk's task walks its 256-row blocks and per block runs prologue, dx and its partial dW / db (addmm into the
//     chunk's copy of W) from the same cache-hot block; a last pass sums the partials in chunk order. dy, pre and x
//     are read once.
//   * tiled (larger W, or fp16 / bf16): per tile of dW (256 or 128 rows of one segment x all or part of K_max,
//     `weight_tile_rows`) the tile owner sums dpre_g^T x_g over the groups that cover it, in group order (with a
//     prologue, the tile forms its strip of dpre 2048 rows at a time in scratch: gelu' is evaluated twice, but no
//     dpre buffer is written and re-read); for fp16 / bf16 each product is formed by BLAS in the input dtype and
//     added to an fp32 tile. Tiles of the first column block also sum db (fp64 running column sums, rows in order).
//     The dx blocks and the dW tiles are one pool of tasks.
// - One op boundary per call: everything above runs inside one dispatcher call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
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
// its exponent bits. Returns exactly 0 below -80 instead of a tiny or denormal value: denormal arithmetic is ~100x
// slower on x86, and callers (erfc tails, Gaussians) only add such values to O(1) terms.
inline float exp_nonpositive(float v) {
  const bool underflow = v < -80.0f;
  v = underflow ? -80.0f : v;
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
  return underflow ? 0.0f : p * scale;
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
// Scheduling: one parallel region per phase, tasks split into contiguous runs of about equal cost
// ---------------------------------------------------------------------------------------------------------------------
// A row block of one group: rows [row0, row1) of group g.
struct RowTask {
  int64_t g, row0, row1;
};

// Rows per task: about 1/16 of all rows (enough tasks to balance a few threads), at least 256 (single-threaded BLAS
// loses ~15% at 128 rows) and at most 1024, a multiple of 64. From the shapes only, never the thread count, so each
// row's GEMM, and hence y and dx, is bit-identical whatever the thread count.
int64_t row_block(int64_t rows) {
  const int64_t b = ((rows + 15) / 16 + 63) / 64 * 64;
  return std::min<int64_t>(1024, std::max<int64_t>(256, b));
}

std::vector<RowTask> row_tasks(const Layout& l, int64_t block) {
  std::vector<RowTask> tasks;
  for (int64_t g = 0; g < l.in.num_groups(); ++g) {
    // The group's rows in equal parts of at most `block` rows: no short last block (a 128-row GEMM after three of
    // 320 rows ran ~8% slower than four of 272 rows).
    const int64_t start = l.in.row_start[g], rows = l.in.row_start[g + 1] - start;
    const int64_t parts = (rows + block - 1) / block;
    for (int64_t p = 0; p < parts; ++p) tasks.push_back({g, start + rows * p / parts, start + rows * (p + 1) / parts});
  }
  return tasks;
}

// Calls fn(i) for every task i in [0, cost.size()), in one parallel region: the threads claim tasks from a shared
// counter, most expensive first (longest-processing-time order), so a thread slowed by another process on its core,
// or a few tiles of unequal cost, do not leave the others idle at the end. Which thread runs a task never changes
// what the task computes (each task owns its outputs and sums in a fixed order), so results do not depend on the
// schedule or the thread count. The BLAS calls inside run single-threaded (MKL / OpenBLAS do not nest inside an
// OpenMP region): the threads work on different row blocks / tiles instead of synchronising once per small GEMM.
template <typename F>
void run_tasks(const std::vector<double>& cost, const F& fn) {
  const int64_t tasks = static_cast<int64_t>(cost.size());
  if (tasks == 0) return;
  std::vector<int64_t> order(tasks);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  std::atomic<int64_t> next{0};
  // The ATen calls inside run on OpenMP worker threads: give them the caller's thread-local state (grad mode and
  // dispatch-key exclusions: the op runs below autograd, so mm_out must not see tensors' requires_grad).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) fn(order[i]);
  });
}

// ---------------------------------------------------------------------------------------------------------------------
// Forward epilogue of a tile: bias, save pre, GELU, row scale, residual on columns [c0, c1) of each segment, and the
// zeros beyond n_g when the tile is the last of its rows (c1 == n_g)
// ---------------------------------------------------------------------------------------------------------------------
// Forward tile: rows [row0, row1) of group g, output columns [c0, c1) (within each segment) of [0, n_g).
struct FwdTask {
  int64_t g, row0, row1, c0, c1;
};

template <typename scalar_t, typename acc_t>
void fwd_epilogue(const Layout& l, const FwdTask& t, bool has_gemm, const scalar_t* gemm_out, const acc_t* bias,
                  const scalar_t* residual, const acc_t* scales, bool gelu_on, scalar_t* pre, scalar_t* y,
                  acc_t* v) {
  const int64_t n = t.c1 - t.c0, N = l.n_max, S = l.segments, seg = l.seg_width;
  const bool tails = t.c1 == l.out.widths[t.g];
  const int64_t tail0 = l.out.widths[t.g] - t.c0;  // first column beyond n_g, relative to c0
  for (int64_t row = t.row0; row < t.row1; ++row) {
    const acc_t rs = scales != nullptr ? scales[row / l.rows_per_sample] : acc_t(1);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t off = row * N + s * seg + t.c0;
      if (has_gemm) {
        const scalar_t* h = gemm_out + off;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) v[j] = static_cast<acc_t>(h[j]);
      } else {  // k_g = 0: the product is empty, only the bias remains
        std::fill(v, v + n, acc_t(0));
      }
      if (bias != nullptr) {
        const acc_t* b = bias + s * seg + t.c0;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) v[j] += b[j];
      }
      if (pre != nullptr) {
        scalar_t* p = pre + off;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) p[j] = static_cast<scalar_t>(v[j]);
        if (tails) std::fill(p + tail0, p + seg - t.c0, scalar_t(0));
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
      // the contract: exactly zero beyond n_g, residual or not
      if (tails) std::fill(out + tail0, out + seg - t.c0, scalar_t(0));
    }
  }
}

// Forward tiles: the group's rows in equal parts of at most `row_block` rows, as in the backward. A wide
// single-segment output (n_g >= 4x the row block: S3.fc1, 3072 columns for blocks of 272 rows) is cut into
// cp ~ sqrt(n_g / block) column parts and the row parts made cp times taller: the same work per tile, but BLAS packs
// less (a 272-row block repacked the whole W slice, 12 MB for a single 4352 x 1024 -> 3072 group); measured 1-3%
// faster on S3.fc1 forward, interleaved in one process. From the shapes only.
std::vector<FwdTask> fwd_tasks(const Layout& l) {
  std::vector<FwdTask> tasks;
  const int64_t block = row_block(l.rows);
  for (int64_t g = 0; g < l.in.num_groups(); ++g) {
    const int64_t start = l.in.row_start[g], rows = l.in.row_start[g + 1] - start, n = l.out.widths[g];
    if (rows == 0) continue;
    const int64_t cp =
        l.segments == 1 && n > block ? std::max<int64_t>(1, static_cast<int64_t>(std::sqrt(double(n) / block))) : 1;
    const int64_t parts = (rows + block * cp - 1) / (block * cp);
    for (int64_t p = 0; p < parts; ++p) {
      for (int64_t q = 0; q < cp; ++q) {
        const int64_t c0 = q == 0 ? 0 : n * q / cp / 64 * 64, c1 = q == cp - 1 ? n : n * (q + 1) / cp / 64 * 64;
        tasks.push_back({g, start + rows * p / parts, start + rows * (p + 1) / parts, c0, c1});
      }
    }
  }
  return tasks;
}

// ---------------------------------------------------------------------------------------------------------------------
// Backward prologue: dresidual (dy on the active columns, 0 elsewhere) and dpre = dy * row_scale * gelu'(pre) on the
// active columns (the rest of dpre is never read), into scratch blocks
// ---------------------------------------------------------------------------------------------------------------------
// out[j] = dy[j] * row_scale * gelu'(pre[j]), j < n (without GELU, pre is null: dy * row_scale).
template <typename scalar_t, typename acc_t>
inline void dpre_row(const scalar_t* d, const scalar_t* h, acc_t rs, int64_t n, scalar_t* out) {
  if (h != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      out[j] = static_cast<scalar_t>(static_cast<acc_t>(d[j]) * rs * gelu_grad(static_cast<acc_t>(h[j])));
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>(static_cast<acc_t>(d[j]) * rs);
  }
}

// The prologue of a row block; dpre (may be null) has rows of N_max values and its row 0 is row `dpre_row0` of dy.
template <typename scalar_t, typename acc_t>
void bwd_prologue(const Layout& l, const RowTask& t, const scalar_t* dy, const scalar_t* pre, const acc_t* scales,
                  scalar_t* dres, scalar_t* dpre, int64_t dpre_row0) {
  const int64_t n = l.out.widths[t.g], N = l.n_max, S = l.segments, seg = l.seg_width;
  for (int64_t row = t.row0; row < t.row1; ++row) {
    const acc_t rs = scales != nullptr ? scales[row / l.rows_per_sample] : acc_t(1);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t off = row * N + s * seg;
      const scalar_t* d = dy + off;
      if (dres != nullptr) {
        scalar_t* r = dres + off;
        std::copy(d, d + n, r);
        std::fill(r + n, r + seg, scalar_t(0));
      }
      if (dpre != nullptr) {
        dpre_row(d, pre != nullptr ? pre + off : nullptr, rs, n, dpre + (row - dpre_row0) * N + s * seg);
      }
    }
  }
}

// dpre of rows [r0, r1), columns [c0, c0 + n) of dy into `out` (r1 - r0 rows of n values): the tiled backward's dW
// tiles form their strip of dpre themselves instead of reading a rows x N_max buffer (see bwd_tiled).
template <typename scalar_t, typename acc_t>
void dpre_strip(const Layout& l, int64_t r0, int64_t r1, int64_t c0, int64_t n, const scalar_t* dy,
                const scalar_t* pre, const acc_t* scales, scalar_t* out) {
  for (int64_t row = r0; row < r1; ++row, out += n) {
    const acc_t rs = scales != nullptr ? scales[row / l.rows_per_sample] : acc_t(1);
    const int64_t off = row * l.n_max + c0;
    dpre_row(dy + off, pre != nullptr ? pre + off : nullptr, rs, n, out);
  }
}

// out[j] += sum over rows r (in order) of src[r * stride + j], j < n, in fp64 running sums (db: summing thousands of
// rows one after the other loses nothing next to the reference's fp32 pairwise sums). Not inside the dispatch macro:
// a #pragma cannot appear in a macro argument.
template <typename scalar_t>
void column_sums(const scalar_t* src, int64_t rows, int64_t n, int64_t stride, double* out) {
  for (int64_t r = 0; r < rows; ++r, src += stride) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] += static_cast<double>(src[j]);
  }
}

// dW / db tiles: rows [j0, j1) of segment s of W, columns [c0, c1).
struct WeightTask {
  int64_t s, j0, j1, c0, c1;
};
// dW tile shape: as large as possible (one addmm per group and tile packs its slices of dpre and x once, and a
// 256 x K_max tile ran ~1.6x faster than the same work as 128 x 128 tiles on S3.fc1 / S1.fc2) while leaving at least
// kMinWeightTiles tiles to share among the threads: 256 rows of a segment, else 128; whole rows of W, else K_max cut
// into equal parts of >= 128 columns. From the shapes only, never the thread count, so the bits of dW do not depend
// on it. (Beyond ~4 threads, shapes with few tiles leave threads idle in this phase.)
constexpr int64_t kMinWeightTiles = 4;

int64_t weight_tile_rows(int64_t segments, int64_t seg_width) {
  return segments * ((seg_width + 255) / 256) >= kMinWeightTiles ? 256 : 128;
}

int64_t weight_tile_cols(int64_t row_tiles, int64_t k_max) {
  const int64_t parts =
      std::max<int64_t>(1, std::min<int64_t>((kMinWeightTiles + row_tiles - 1) / row_tiles, k_max / 128));
  return ((k_max + parts - 1) / parts + 63) / 64 * 64;
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
  const std::vector<FwdTask> tasks = fwd_tasks(l);
  std::vector<double> cost;
  for (const FwdTask& t : tasks) {  // GEMM MACs plus the epilogue's elements
    const double rows = static_cast<double>(t.row1 - t.row0);
    cost.push_back(rows * static_cast<double>(l.segments) *
                   (static_cast<double>(l.in.widths[t.g] * (t.c1 - t.c0)) + (t.c1 - t.c0) +
                    (t.c1 == l.out.widths[t.g] ? l.seg_width - l.out.widths[t.g] : 0)));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kFwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor b = present(bias) ? bias->to(acc_type).contiguous() : at::Tensor();  // N_max values, once
    const std::vector<acc_t> scales = scales_of<acc_t>(row_scale);
    // fp16 / bf16 keep the epilogue path: it adds the bias in fp32 after the GEMM (one rounding).
    const bool plain =
        !gelu_on && !present(residual) && !save_pre && (!present(bias) || std::is_same_v<acc_t, scalar_t>);
    run_tasks(cost, [&](int64_t i) {
      const FwdTask& t = tasks[i];
      const int64_t k = l.in.widths[t.g], n = l.out.widths[t.g], rows = t.row1 - t.row0;
      const bool has_gemm = k > 0 && t.c1 > t.c0;
      // A group of full segment width covers every segment contiguously: one GEMM over all of them (tiles with
      // several segments always span all n_g columns).
      const bool whole = l.segments > 1 && n == l.seg_width;
      const int64_t calls = whole ? 1 : l.segments, width = whole ? l.n_max : t.c1 - t.c0;
      if (has_gemm && plain) {
        // No GELU / residual / pre: the GEMM writes y directly, the bias folded in as addmm's beta = 1 term, and
        // only the tails beyond n_g are written afterwards. Saves a read + write pass over y, which on wide,
        // short-K layers (S1: 65k rows x 768) cost ~40% on top of the GEMM.
        const at::Tensor xb = x.narrow(0, t.row0, rows).narrow(1, 0, k);
        for (int64_t s = 0; s < calls; ++s) {
          const int64_t col = s * l.seg_width + t.c0;
          at::Tensor out = y.narrow(0, t.row0, rows).narrow(1, col, width);
          const at::Tensor ws = weight.narrow(0, col, width).narrow(1, 0, k).t();
          if (present(bias)) {
            at::addmm_out(out, bias->narrow(0, col, width).unsqueeze(0).expand({rows, width}), xb, ws);
          } else {
            at::mm_out(out, xb, ws);
          }
        }
        if (n < l.seg_width && t.c1 == n) {
          scalar_t* yp = y.mutable_data_ptr<scalar_t>();
          for (int64_t row = t.row0; row < t.row1; ++row) {
            for (int64_t s = 0; s < l.segments; ++s) {
              scalar_t* o = yp + row * l.n_max + s * l.seg_width;
              std::fill(o + n, o + l.seg_width, scalar_t(0));
            }
          }
        }
        return;
      }
      if (has_gemm) {
        const at::Tensor xb = x.narrow(0, t.row0, rows).narrow(1, 0, k);
        for (int64_t s = 0; s < calls; ++s) {
          const int64_t col = s * l.seg_width + t.c0;
          at::Tensor out = gemm_out.narrow(0, t.row0, rows).narrow(1, col, width);
          at::mm_out(out, xb, weight.narrow(0, col, width).narrow(1, 0, k).t());
        }
      }
      std::vector<acc_t> buf(static_cast<size_t>(std::max<int64_t>(t.c1 - t.c0, 1)));
      fwd_epilogue<scalar_t, acc_t>(l, t, has_gemm, gemm_out.const_data_ptr<scalar_t>(),
                                    b.defined() ? b.const_data_ptr<acc_t>() : nullptr,
                                    present(residual) ? residual->const_data_ptr<scalar_t>() : nullptr,
                                    scales.empty() ? nullptr : scales.data(), gelu_on,
                                    save_pre ? pre.mutable_data_ptr<scalar_t>() : nullptr,
                                    y.mutable_data_ptr<scalar_t>(), buf.data());
    });
  });
  return {y, pre};
}

namespace {

// ---------------------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------------------
struct BwdArgs {
  const Layout& l;
  const at::Tensor& dy;
  const at::Tensor& x;
  const at::Tensor& weight;
  at::Tensor& dx;
  at::Tensor& dw;  // acc dtype (fp32 for half types)
  at::Tensor& db;  // fp64, N_max values or empty
  bool has_bias, has_residual, write_dpre;
};

// dx of one row block: sum over segments of dpre_s @ W_s into x's first k_g columns, zeros beyond k_g.
// dps(c0, w) is the block's dpre on columns [c0, c0 + w) (a strided view). A group of full segment width reads all
// segments as one GEMM (its dpre columns and W rows are contiguous then).
template <typename DpsFn>
void dx_block(const BwdArgs& a, const RowTask& t, const DpsFn& dps) {
  const Layout& l = a.l;
  const int64_t k = l.in.widths[t.g], n = l.out.widths[t.g], rows = t.row1 - t.row0;
  at::Tensor dxb = a.dx.narrow(0, t.row0, rows);
  if (k == 0 || n == 0) {
    dxb.zero_();  // no product: x gets no gradient from this group
    return;
  }
  at::Tensor dxk = dxb.narrow(1, 0, k);
  if (n == l.seg_width) {
    at::mm_out(dxk, dps(0, l.n_max), a.weight.narrow(1, 0, k));
  } else {
    for (int64_t s = 0; s < l.segments; ++s) {
      const at::Tensor ws = a.weight.narrow(0, s * l.seg_width, n).narrow(1, 0, k);
      if (s == 0) {
        at::mm_out(dxk, dps(0, n), ws);
      } else {
        at::addmm_out(dxk, dxk, dps(s * l.seg_width, n), ws);
      }
    }
  }
  if (k < l.k_max) dxb.narrow(1, k, l.k_max - k).zero_();
}

// Cuts `cost` into `parts` contiguous runs of about equal total; returns the parts + 1 boundaries.
std::vector<int64_t> equal_cost_runs(const std::vector<double>& cost, int64_t parts) {
  const int64_t tasks = static_cast<int64_t>(cost.size());
  std::vector<int64_t> bounds(parts + 1, tasks);
  bounds[0] = 0;
  double total = 0;
  for (double c : cost) total += c;
  double seen = 0;
  int64_t next = 1;
  for (int64_t i = 0; i < tasks && next < parts; ++i) {
    seen += cost[i];
    while (next < parts && seen >= total * static_cast<double>(next) / static_cast<double>(parts)) {
      bounds[next++] = i + 1;
    }
  }
  return bounds;
}

// Fused backward, for a small W (<= kFusedMaxWeight elements; fp32 / fp64): the rows are cut into kFusedChunks
// contiguous chunks fixed by the shapes; one task per chunk walks its row blocks of kFusedBlock rows and, per block,
// writes the prologue into a scratch block (L2-sized), then dx and this chunk's partial dW / db from that scratch.
// A final pass sums the partials over the chunks in chunk order. This reads dy, pre and x once, for kFusedChunks
// copies of W in partials; the tiled path reads x once per W tile and evaluates the prologue twice (on S1 shapes,
// 65k rows x 768, a rows x N_max dpre buffer and those re-reads were most of the backward's time: fwd+bwd of S1.fc1
// went from 1.1x to ~2x the per-group loop). Chunks depend on the shapes only, so dW / db do not depend on the thread
// count.
constexpr int64_t kFusedMaxWeight = int64_t(1) << 18;
constexpr int64_t kFusedBlock = 256;
constexpr int64_t kFusedChunks = 16;

template <typename scalar_t, typename acc_t>
void bwd_fused(const BwdArgs& a, const scalar_t* pre_p, const acc_t* scales, scalar_t* dres_p) {
  const Layout& l = a.l;
  const int64_t N = l.n_max, K = l.k_max, S = l.segments, seg = l.seg_width;
  const std::vector<RowTask> blocks = row_tasks(l, kFusedBlock);
  if (blocks.empty()) {
    a.dw.zero_();
    if (a.has_bias) a.db.zero_();
    return;
  }
  std::vector<double> bcost;
  for (const RowTask& t : blocks) {
    bcost.push_back(static_cast<double>(t.row1 - t.row0) *
                    (2.0 * static_cast<double>(l.in.widths[t.g] * l.out.widths[t.g] * S) + static_cast<double>(N + K)));
  }
  const int64_t chunks = std::min<int64_t>(kFusedChunks, static_cast<int64_t>(blocks.size()));
  const std::vector<int64_t> bounds = equal_cost_runs(bcost, chunks);
  std::vector<double> ccost(chunks, 0.0);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t b = bounds[c]; b < bounds[c + 1]; ++b) ccost[c] += bcost[b];
  }
  at::Tensor partial = at::empty({chunks, N, K}, a.dw.options());
  std::vector<double> db_part(a.has_bias ? chunks * N : 0, 0.0);
  const scalar_t* dy_p = a.dy.const_data_ptr<scalar_t>();
  run_tasks(ccost, [&](int64_t c) {
    at::Tensor part = partial[c];
    part.zero_();  // here rather than at allocation: the owning thread touches its pages first
    at::Tensor scratch = a.write_dpre ? at::empty({kFusedBlock, N}, a.x.options()) : at::Tensor();
    scalar_t* scratch_p = a.write_dpre ? scratch.mutable_data_ptr<scalar_t>() : nullptr;
    for (int64_t b = bounds[c]; b < bounds[c + 1]; ++b) {
      const RowTask& t = blocks[b];
      const int64_t k = l.in.widths[t.g], n = l.out.widths[t.g], rows = t.row1 - t.row0;
      if (a.has_residual || a.write_dpre) {
        bwd_prologue<scalar_t, acc_t>(l, t, dy_p, pre_p, scales, dres_p, scratch_p, t.row0);
      }
      const at::Tensor src = a.write_dpre ? scratch.narrow(0, 0, rows) : a.dy.narrow(0, t.row0, rows);
      const auto dps = [&](int64_t c0, int64_t w) { return src.narrow(1, c0, w); };
      dx_block(a, t, dps);
      if (n == 0) continue;
      if (k > 0) {
        const at::Tensor xb = a.x.narrow(0, t.row0, rows).narrow(1, 0, k);
        for (int64_t s = 0; s < S; ++s) {
          at::Tensor sub = part.narrow(0, s * seg, n).narrow(1, 0, k);
          at::addmm_out(sub, sub, dps(s * seg, n).t(), xb);
        }
      }
      if (a.has_bias) {
        const scalar_t* base = src.const_data_ptr<scalar_t>();
        for (int64_t s = 0; s < S; ++s) column_sums(base + s * seg, rows, n, N, db_part.data() + c * N + s * seg);
      }
    }
  });
  // dW = sum of the partials in chunk order (each element the same order whatever the thread splitting W's rows).
  acc_t* dw_p = a.dw.mutable_data_ptr<acc_t>();
  const acc_t* part_p = partial.const_data_ptr<acc_t>();
  at::parallel_for(0, N, 8, [&](int64_t r0, int64_t r1) {
    const int64_t len = (r1 - r0) * K;
    acc_t* out = dw_p + r0 * K;
    std::copy(part_p + r0 * K, part_p + r0 * K + len, out);
    for (int64_t c = 1; c < chunks; ++c) {
      const acc_t* p = part_p + c * N * K + r0 * K;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) out[i] += p[i];
    }
  });
  if (a.has_bias) {
    double* dbp = a.db.mutable_data_ptr<double>();
    for (int64_t j = 0; j < N; ++j) {
      double v = 0;
      for (int64_t c = 0; c < chunks; ++c) v += db_part[c * N + j];
      dbp[j] = v;
    }
  }
}

// Tiled backward (large W, or half types), one pool of independent tasks:
// - per row block: the prologue (dresidual, and dpre into a scratch block), then dx;
// - per tile of dW (`weight_tile_rows` rows of one segment x `weight_tile_cols` columns): the tile owner sums
//   dpre_g^T x_g over the groups that cover it, in group order; tiles of the first column block also sum db (fp64
//   running column sums over the rows in order). Without GELU / row scale dpre is dy itself (one GEMM per group over
//   all its rows); with them the tile forms its strip of dpre for kStripRows rows at a time in a scratch block and
//   adds one GEMM per strip. The strips recompute gelu' once more (dx computed it too), which is cheaper than
//   writing and re-reading a rows x N_max dpre buffer. fp16 / bf16: each product is formed by BLAS in the input
//   dtype and added to the fp32 tile (one rounding per group or strip).
constexpr int64_t kStripRows = 2048;  // a group of up to 2048 rows is one GEMM per tile (S3: 1088 rows)

template <typename scalar_t, typename acc_t>
void bwd_tiled(const BwdArgs& a, const scalar_t* pre_p, const acc_t* scales, scalar_t* dres_p) {
  const Layout& l = a.l;
  const bool half = a.dw.scalar_type() != a.x.scalar_type();
  const scalar_t* dy_p = a.dy.const_data_ptr<scalar_t>();

  const std::vector<RowTask> tasks = row_tasks(l, row_block(l.rows));
  std::vector<double> cost;
  for (const RowTask& t : tasks) {
    const double rows = static_cast<double>(t.row1 - t.row0);
    cost.push_back(rows * (static_cast<double>(l.in.widths[t.g] * l.out.widths[t.g] * l.segments) + l.n_max +
                           l.k_max));
  }
  const auto dx_task = [&](int64_t i) {
    const RowTask& t = tasks[i];
    const int64_t rows = t.row1 - t.row0;
    at::Tensor scratch = a.write_dpre ? at::empty({rows, l.n_max}, a.x.options()) : at::Tensor();
    if (a.has_residual || a.write_dpre) {
      bwd_prologue<scalar_t, acc_t>(l, t, dy_p, pre_p, scales, dres_p,
                                    a.write_dpre ? scratch.mutable_data_ptr<scalar_t>() : nullptr, t.row0);
    }
    const at::Tensor src = a.write_dpre ? scratch : a.dy.narrow(0, t.row0, rows);
    dx_block(a, t, [&](int64_t c0, int64_t w) { return src.narrow(1, c0, w); });
  };

  std::vector<WeightTask> wtasks;
  std::vector<double> wcost;
  const int64_t tile_rows = weight_tile_rows(l.segments, l.seg_width);
  const int64_t tile_cols = weight_tile_cols(l.segments * ((l.seg_width + tile_rows - 1) / tile_rows), l.k_max);
  for (int64_t s = 0; s < l.segments; ++s) {
    for (int64_t j0 = 0; j0 < l.seg_width; j0 += tile_rows) {
      for (int64_t c0 = 0; c0 < l.k_max; c0 += tile_cols) {
        WeightTask t{s, j0, std::min(j0 + tile_rows, l.seg_width), c0, std::min(c0 + tile_cols, l.k_max)};
        double c = 1;
        for (int64_t g = 0; g < l.in.num_groups(); ++g) {
          const int64_t n = std::min(l.out.widths[g], t.j1) - t.j0, k = std::min(l.in.widths[g], t.c1) - t.c0;
          if (n > 0 && k > 0) c += static_cast<double>(l.in.rows(g) * n * k);
          if (n > 0 && (t.c0 == 0 || a.write_dpre)) c += static_cast<double>(l.in.rows(g) * n);
        }
        wtasks.push_back(t);
        wcost.push_back(c);
      }
    }
  }
  int64_t strip_rows = 0;  // the most rows of one strip
  for (int64_t g = 0; g < l.in.num_groups(); ++g) strip_rows = std::max(strip_rows, std::min(l.in.rows(g), kStripRows));
  const auto dw_task = [&](int64_t i) {
    const WeightTask& t = wtasks[i];
    const int64_t w0 = t.s * l.seg_width + t.j0;  // first row of W in this tile
    at::Tensor tile = a.dw.narrow(0, w0, t.j1 - t.j0).narrow(1, t.c0, t.c1 - t.c0);
    tile.zero_();
    double* dbp = a.has_bias && t.c0 == 0 ? a.db.mutable_data_ptr<double>() + w0 : nullptr;
    if (dbp != nullptr) std::fill(dbp, dbp + (t.j1 - t.j0), 0.0);
    at::Tensor strip;
    for (int64_t g = 0; g < l.in.num_groups(); ++g) {
      const int64_t rows = l.in.rows(g), row0 = l.in.row_start[g];
      const int64_t n = std::min(l.out.widths[g], t.j1) - t.j0, k = std::min(l.in.widths[g], t.c1) - t.c0;
      if (rows == 0 || n <= 0) continue;
      // Strips of the group's rows: all of them when dpre is dy, else kStripRows at a time (equal parts).
      const int64_t parts = a.write_dpre ? (rows + kStripRows - 1) / kStripRows : 1;
      for (int64_t p = 0; p < parts; ++p) {
        const int64_t r0 = row0 + rows * p / parts, r1 = row0 + rows * (p + 1) / parts;
        at::Tensor dps;
        if (a.write_dpre) {
          if (!strip.defined()) strip = at::empty({strip_rows * (t.j1 - t.j0)}, a.x.options());
          dps = strip.narrow(0, 0, (r1 - r0) * n).view({r1 - r0, n});
          dpre_strip<scalar_t, acc_t>(l, r0, r1, w0, n, dy_p, pre_p, scales, dps.mutable_data_ptr<scalar_t>());
        } else {
          dps = a.dy.narrow(0, r0, r1 - r0).narrow(1, w0, n);
        }
        if (k > 0) {
          const at::Tensor xg = a.x.narrow(0, r0, r1 - r0).narrow(1, t.c0, k);
          at::Tensor sub = tile.narrow(0, 0, n).narrow(1, 0, k);
          if (half) {
            sub.add_(at::mm(dps.t(), xg));
          } else {
            at::addmm_out(sub, sub, dps.t(), xg);
          }
        }
        if (dbp != nullptr) column_sums(dps.const_data_ptr<scalar_t>(), r1 - r0, n, dps.stride(0), dbp);
      }
    }
  };

  const int64_t nx = static_cast<int64_t>(cost.size());
  std::vector<double> all(cost);
  all.insert(all.end(), wcost.begin(), wcost.end());
  run_tasks(all, [&](int64_t i) { i < nx ? dx_task(i) : dw_task(i - nx); });
}

}  // namespace

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

  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  at::Tensor dres = has_residual ? at::empty({l.rows, l.n_max}, x.options()) : at::empty({0}, x.options());
  at::Tensor dx = at::empty({l.rows, l.k_max}, x.options());
  // fp32 accumulator for half types (each group's product is added with one rounding); fp32 / fp64 in place.
  at::Tensor dw = at::empty({l.n_max, l.k_max}, x.options().dtype(half ? at::kFloat : x.scalar_type()));
  at::Tensor db = at::empty({has_bias ? l.n_max : 0}, x.options().dtype(at::kDouble));
  const BwdArgs args{l, dy, x, weight, dx, dw, db, has_bias, has_residual, gelu_on || present(row_scale)};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kBwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> scales = scales_of<acc_t>(row_scale);
    const acc_t* sp = scales.empty() ? nullptr : scales.data();
    const scalar_t* pre_p = gelu_on ? pre->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dres_p = has_residual ? dres.mutable_data_ptr<scalar_t>() : nullptr;
    if (!half && l.n_max * l.k_max <= kFusedMaxWeight) {
      bwd_fused<scalar_t, acc_t>(args, pre_p, sp, dres_p);
    } else {
      bwd_tiled<scalar_t, acc_t>(args, pre_p, sp, dres_p);
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
