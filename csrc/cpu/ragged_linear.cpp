// Ragged (variable-width) linear on CPU: the public op resnas::ragged_linear (argument checks, autograd) and
// its kernels resnas::ext_ragged_linear_fwd / _bwd.
//
// Schemas (defined in ../registration.cpp; semantics: `_reference_fwd` / `_reference_bwd` in
// resnas_kernels/ops/ragged_linear/reference_backend.py):
//   ragged_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor? row_scale, int[] sizes,
//                 Tensor in_widths, Tensor out_widths, int segments=1, str? activation=None) -> Tensor
//     What `resnas_kernels.ragged_linear` calls on the cpu backend: one dispatcher hop. Its Autograd kernel checks the
//     arguments (ValueError / TypeError naming them as the public function does) and runs a
//     torch::autograd::Function over the two kernels below, through the dispatcher (so torch.compile traces them with
//     their Python fake implementations); below autograd (inference mode) a CompositeExplicitAutograd kernel runs
//     the checks and the forward alone.
//   ext_ragged_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor? row_scale, int[] sizes,
//                         Tensor in_widths, Tensor out_widths, int segments, bool gelu, bool save_pre)
//                         -> (Tensor y, Tensor pre)
//   ext_ragged_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor? pre, Tensor? row_scale, int[] sizes,
//                         Tensor in_widths, Tensor out_widths, int segments, bool gelu, bool has_bias,
//                         bool has_residual) -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dres)
//   x: (B, ..., K_max), flattened to rows of K_max values; group g owns the rows of its sizes[g] samples, reads
//   x[:, :k_g] and, in each segment s, weight[s*Nseg : s*Nseg + n_g, :k_g] (Nseg = N_max / segments). in_widths /
//   out_widths are the int32 (G,) widths k_g / n_g (device metadata; CPU tensors here, whose values the kernels read
//   and check: a width outside [0, K_max] / [0, Nseg] is a ValueError, so no width addresses memory outside the
//   tensors). y: (B, ..., N_max), zero beyond n_g in every segment; pre = x W^T + b (the GELU input) when save_pre,
//   else (0,).
//
// Design and caveats:
// - No weight copies and no tensor views: every GEMM is one BLAS call on raw pointers with leading dimensions (x's
//   first k_g columns, W's rows / columns of a segment, the output's active columns, row stride N_max). A step of a
//   supernet makes thousands of these GEMMs; as ATen views (narrow / slice / as_strided + addmm per group and tile)
//   they were ~40k dispatcher calls per step. fp32 / fp64 call the BLAS that PyTorch links (sgemm_ / dgemm_), fp16 /
//   bf16 the BLAS's half-input, fp32-output GEMMs (products accumulated and kept in fp32, one rounding at the end);
//   a PyTorch build without those symbols falls back to ATen's matmul on wrapped blocks (`aten_gemm`).
// - Scheduling: each phase is ONE parallel region over tasks; the threads claim tasks from a shared counter, most
//   expensive first, and the BLAS calls inside run single-threaded (BLAS does not nest inside an OpenMP region).
//   Versus multithreaded BLAS per group, the threads do not synchronise once per small GEMM (which on a shared or
//   oversubscribed machine cost more than the GEMMs), each block's epilogue runs while its GEMM output is hot, and a
//   thread slowed by another process simply claims fewer tasks. Tasks are fixed by the shapes and own their outputs,
//   so results do not depend on the schedule or the thread count.
// - Forward, per tile (group, row block of 256..1024 rows, the group's rows cut into equal parts; a wide single-segment
//   output also in column parts with taller row blocks, `fwd_tasks`): one GEMM per segment (one over all segments
//   for a group of full segment width) into the output (or the pre-activation buffer when it is kept; an fp32
//   scratch block for half types), then the whole epilogue (bias, save pre, exact GELU, row scale, residual) and the
//   zeros beyond n_g. Without GELU / residual / saved pre (fp32 / fp64), the GEMM accumulates onto y pre-filled with
//   the bias and only the tails beyond n_g are written after it (no epilogue pass).
//   Dense calls (fp32 / fp64, every group with rows at k_g = K_max and n_g = Nseg: a searched net's layers) run one
//   multithreaded GEMM over all rows instead, as F.linear does (the per-block GEMMs repack W once per block, ~25%
//   slower on one full-width group), then the epilogue in row blocks.
// - Exact GELU for fp32 / half types uses an erfc approximation written to vectorise under `omp simd` (std::erf
//   does not, and was ~15x slower here): Numerical Recipes' Chebyshev erfc (fractional error < 1.2e-7) with a
//   Cody-Waite exp; |error| of gelu(x) <= ~1.1e-7 * max(1, |x|). fp64 uses std::erf / std::exp (gradcheck).
// - Backward prologue (only with a residual, row scale or GELU): dresidual (dy on the active columns, 0 elsewhere) and
//   dpre = dy * row_scale * gelu'(pre), formed block by block in scratch memory, never as a rows x N_max buffer.
//   dx = sum over segments of dpre_s @ W_s (GEMMs into dx's first k_g columns), zeros beyond k_g.
//   Two ways to get dW / db, both deterministic and independent of the thread count (no atomics; every sum has an
//   order fixed by the shapes):
//   * fused (W of <= kFusedMaxWeight elements, fp32 / fp64; the S1 layers): the rows are cut into <= 16 chunks; a
//     chunk's task walks its 256-row blocks and per block runs prologue, dx and its partial dW / db (a GEMM into the
//     chunk's copy of W) from the same cache-hot block; a last pass sums the partials in chunk order. dy, pre and x
//     are read once.
//   * tiled (larger W, or fp16 / bf16): per tile of dW (256 or 128 rows of one segment x all or part of K_max,
//     `weight_tile_rows`) the tile owner sums dpre_g^T x_g over the groups that cover it, in group order (with a
//     prologue, the tile forms its strip of dpre 2048 rows at a time in scratch: gelu' is evaluated twice, but no
//     dpre buffer is written and re-read); fp16 / bf16 products accumulate into an fp32 tile. Tiles of the first
//     column block also sum db (fp64 running column sums, rows in order). The dx blocks and the dW tiles are one
//     pool of tasks.
// - Scratch memory comes from ATen's CPU allocator directly (no tensors): the kernels make no dispatcher calls
//   besides allocating their outputs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/CPUAllocator.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../ragged.h"
#include "blas.h"

namespace resnas {
namespace {

using cpu_blas::gemm;
using cpu_blas::Scratch;

constexpr const char* kOpName = "ragged_linear";
constexpr const char* kFwdName = "ext_ragged_linear_fwd";
constexpr const char* kBwdName = "ext_ragged_linear_bwd";

// ---------------------------------------------------------------------------------------------------------------------
// Exact GELU and its derivative. Float versions are branch-light and inline so that `omp simd` loops vectorise.
// ---------------------------------------------------------------------------------------------------------------------
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

// rows x cols block of `value` at p (leading dimension ld).
template <typename T>
inline void fill_block(T* p, int64_t rows, int64_t cols, int64_t ld, T value) {
  if (cols <= 0) return;
  for (int64_t r = 0; r < rows; ++r) std::fill(p + r * ld, p + r * ld + cols, value);
}

// ---------------------------------------------------------------------------------------------------------------------
// Kernel argument checks (the public op checks everything first, `check_public_args`; these guard direct calls of
// the ext_* ops and read the widths' values)
// ---------------------------------------------------------------------------------------------------------------------
inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_float_cpu(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name, " must be float32/float64/float16/bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

struct Layout {
  GroupTable in;   // rows and k_g
  GroupTable out;  // rows and n_g
  int64_t rows, k_max, n_max, segments, seg_width, rows_per_sample;
  std::vector<int64_t> out_shape;  // x's shape with N_max last
};

// The values of a CPU widths tensor (any stride), each checked against [0, bound]; messages name the public
// function's argument (`name`), as `resnas_kernels.ragged_linear` reports them. `segments` > 0: output widths, bound
// by the segment width; else input widths, bound by K_max.
std::vector<int64_t> width_values(const at::Tensor& widths, int64_t groups, int64_t bound, const at::Tensor& x,
                                  const char* op, const char* arg, const char* name, int64_t segments = 0) {
  check_widths_tensor(widths, groups, x, op, arg, "x");
  const auto w = widths.accessor<int32_t, 1>();
  std::vector<int64_t> values(groups);
  for (int64_t g = 0; g < groups; ++g) {
    values[g] = w[g];
    TORCH_CHECK_VALUE(values[g] >= 0, op, ": ", name, "[", g, "]=", values[g], " must be >= 0");
    if (segments > 0) {
      TORCH_CHECK_VALUE(values[g] <= bound, op, ": ", name, "[", g, "]=", values[g], " exceeds the segment width ",
                        bound, " (N_max=", bound * segments, " / segments=", segments, "); ", name, " (", arg,
                        ") must lie in [0, ", bound, "]");
    } else {
      TORCH_CHECK_VALUE(values[g] <= bound, op, ": ", name, "[", g, "]=", values[g], " exceeds the maximum width ",
                        bound, " of x; ", name, " (", arg, ") must lie in [0, ", bound, "]");
    }
  }
  return values;
}

Layout check_layout(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef sizes, const at::Tensor& in_widths,
                    const at::Tensor& out_widths, int64_t segments, const std::optional<at::Tensor>& row_scale,
                    const char* op) {
  check_float_cpu(x, "x", op);
  check_float_cpu(weight, "weight", op);
  TORCH_CHECK(x.dim() >= 2, op, ": x must have at least 2 dims, got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D, got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
  TORCH_CHECK(weight.size(1) == x.size(-1) && weight.size(1) >= 1, op, ": weight must have shape (N_max, ",
              x.size(-1), ") (K_max = x.size(-1) >= 1), got ", weight.sizes());
  TORCH_CHECK(segments >= 1 && weight.size(0) % segments == 0, op, ": segments=", segments,
              " must be >= 1 and divide N_max = ", weight.size(0));
  TORCH_CHECK(!sizes.empty(), op, ": sizes must name at least one group, got an empty list");
  Layout l;
  l.k_max = x.size(-1);
  l.rows = x.numel() / l.k_max;
  l.n_max = weight.size(0);
  l.segments = segments;
  l.seg_width = l.n_max / segments;
  const int64_t batch = x.size(0);
  l.rows_per_sample = batch > 0 && l.rows > 0 ? l.rows / batch : 1;
  TORCH_CHECK(l.rows <= INT_MAX, op, ": ", l.rows, " rows do not fit the BLAS's 32-bit integers");
  std::vector<int64_t> row_counts;
  int64_t samples = 0;
  for (const int64_t s : sizes) {
    TORCH_CHECK_VALUE(s >= 0, op, ": sizes must be >= 0, got ", sizes);
    row_counts.push_back(s * l.rows_per_sample);
    samples += s;
  }
  TORCH_CHECK_VALUE(samples == batch, op, ": sum of group sizes (", samples, ", sizes=", sizes,
                    ") must equal the batch size of x (dim 0: ", batch, ")");
  const int64_t groups = static_cast<int64_t>(sizes.size());
  const std::vector<int64_t> k = width_values(in_widths, groups, l.k_max, x, op, "in_widths", "in_groups.widths");
  const std::vector<int64_t> n =
      width_values(out_widths, groups, l.seg_width, x, op, "out_widths", "out_widths", segments);
  l.in = make_group_table(row_counts, k, l.rows, l.k_max, op, "x");
  l.out = make_group_table(row_counts, n, l.rows, l.seg_width, op, "a weight segment (N_max / segments)");
  l.out_shape = x.sizes().vec();
  l.out_shape.back() = l.n_max;
  if (present(row_scale)) {
    const at::Tensor& s = *row_scale;
    TORCH_CHECK(s.dim() == 1 && s.size(0) == batch, op, ": row_scale must have shape (", batch,
                ",) (one scale per sample), got ", s.sizes());
    TORCH_CHECK(s.scalar_type() == x.scalar_type() || s.scalar_type() == at::kFloat, op,
                ": row_scale must have x's dtype or float32, got ", s.scalar_type());
    TORCH_CHECK(s.device() == x.device() && s.is_contiguous(), op, ": row_scale must be contiguous, on x's device");
  }
  return l;
}

void check_like(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
                const char* op) {
  if (!present(t)) return;
  check_float_cpu(*t, name, op);
  TORCH_CHECK(t->sizes() == shape && t->scalar_type() == dtype, op, ": ", name, " must have shape ", shape,
              " and dtype ", dtype, ", got ", t->sizes(), " ", t->scalar_type());
}

// A float vector as acc_t values (bias: x's dtype; row_scale: x's dtype or fp32), converted once.
template <typename acc_t>
std::vector<acc_t> values_of(const std::optional<at::Tensor>& t) {
  if (!present(t)) return {};
  std::vector<acc_t> out(static_cast<size_t>(t->numel()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "ragged_linear", [&] {
    const scalar_t* p = t->const_data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<acc_t>(p[i]);
  });
  return out;
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
// schedule or the thread count. The BLAS calls inside run single-threaded (`SequentialBlas`; also with one thread, so a
// tile is computed by the same code whatever the thread count): the threads work on different row blocks / tiles
// instead of synchronising once per small GEMM.
template <typename F>
void run_tasks(const std::vector<double>& cost, const F& fn) {
  const int64_t tasks = static_cast<int64_t>(cost.size());
  if (tasks == 0) return;
  std::vector<int64_t> order(tasks);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const cpu_blas::SequentialBlas sequential;
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

// The GEMM output of row r is at gemm_out + (r - gemm_row0) * N_max (the output itself, or a scratch block).
template <typename scalar_t, typename acc_t, typename gemm_t>
void fwd_epilogue(const Layout& l, const FwdTask& t, bool has_gemm, const gemm_t* gemm_out, int64_t gemm_row0,
                  const acc_t* bias, const scalar_t* residual, const acc_t* scales, bool gelu_on, scalar_t* pre,
                  scalar_t* y, acc_t* v) {
  const int64_t n = t.c1 - t.c0, N = l.n_max, S = l.segments, seg = l.seg_width;
  const bool tails = t.c1 == l.out.widths[t.g];
  const int64_t tail0 = l.out.widths[t.g] - t.c0;  // first column beyond n_g, relative to c0
  for (int64_t row = t.row0; row < t.row1; ++row) {
    const acc_t rs = scales != nullptr ? scales[row / l.rows_per_sample] : acc_t(1);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t off = row * N + s * seg + t.c0;
      if (has_gemm) {
        const gemm_t* h = gemm_out + (row - gemm_row0) * N + s * seg + t.c0;
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

// Dense call: every group with rows uses the whole weight (k_g = K_max, n_g = Nseg).
bool is_dense(const Layout& l) {
  if (l.rows == 0) return false;
  for (int64_t g = 0; g < l.in.num_groups(); ++g) {
    if (l.in.rows(g) > 0 && (l.in.widths[g] != l.k_max || l.out.widths[g] != l.seg_width)) return false;
  }
  return true;
}

template <typename scalar_t, typename acc_t>
void fwd_kernel(const Layout& l, const scalar_t* x, const scalar_t* w, const acc_t* bias, const scalar_t* residual,
                const acc_t* scales, bool gelu_on, scalar_t* pre, scalar_t* y) {
  constexpr bool half = !std::is_same_v<scalar_t, acc_t>;
  const int64_t N = l.n_max, K = l.k_max, S = l.segments, seg = l.seg_width;
  // No GELU / residual / pre (fp32 / fp64): the GEMM accumulates onto y pre-filled with the bias, and only the tails
  // beyond n_g are written after it. Saves a read + write pass over y, which on wide, short-K layers (S1: 65k rows x
  // 768) cost ~40% on top of the GEMM.
  const bool plain = !half && !gelu_on && residual == nullptr && pre == nullptr;
  scalar_t* gemm_dst = pre != nullptr ? pre : y;  // fp32 / fp64: the pre-activation buffer when it is kept, else y
  const auto epilogue_cost = [&](const FwdTask& t) {
    return static_cast<double>(t.row1 - t.row0) * static_cast<double>(S) *
           static_cast<double>((t.c1 - t.c0) + (t.c1 == l.out.widths[t.g] ? seg - l.out.widths[t.g] : 0));
  };

  if constexpr (!half) {
    if (is_dense(l)) {  // one multithreaded GEMM over all rows (outside any parallel region), as F.linear
      if (plain && bias != nullptr) {
        for (int64_t r = 0; r < l.rows; ++r) std::copy(bias, bias + N, y + r * N);
      }
      gemm<scalar_t, acc_t>(false, true, l.rows, N, K, x, K, w, K, plain && bias != nullptr ? 1 : 0, gemm_dst, N);
      if (plain) return;
      std::vector<FwdTask> tasks;
      std::vector<double> cost;
      for (const RowTask& t : row_tasks(l, row_block(l.rows))) {
        tasks.push_back({t.g, t.row0, t.row1, 0, seg});
        cost.push_back(epilogue_cost(tasks.back()));
      }
      run_tasks(cost, [&](int64_t i) {
        std::vector<acc_t> buf(static_cast<size_t>(seg));
        fwd_epilogue<scalar_t, acc_t, scalar_t>(l, tasks[i], true, gemm_dst, 0, bias, residual, scales, gelu_on, pre,
                                                y, buf.data());
      });
      return;
    }
  }

  const std::vector<FwdTask> tasks = fwd_tasks(l);
  std::vector<double> cost;
  for (const FwdTask& t : tasks) {  // GEMM MACs plus the epilogue's elements
    cost.push_back(static_cast<double>(t.row1 - t.row0) * static_cast<double>(S) *
                       static_cast<double>(l.in.widths[t.g] * (t.c1 - t.c0)) + epilogue_cost(t));
  }
  run_tasks(cost, [&](int64_t i) {
    const FwdTask& t = tasks[i];
    const int64_t k = l.in.widths[t.g], n = l.out.widths[t.g], rows = t.row1 - t.row0;
    const bool has_gemm = k > 0 && t.c1 > t.c0;
    // A group of full segment width covers every segment contiguously: one GEMM over all of them (tiles with
    // several segments always span all n_g columns).
    const bool whole = S > 1 && n == seg;
    const int64_t calls = whole ? 1 : S, width = whole ? N : t.c1 - t.c0;
    const scalar_t* xb = x + t.row0 * K;
    if constexpr (!half) {
      if (has_gemm && plain) {
        for (int64_t s = 0; s < calls; ++s) {
          const int64_t col = s * seg + t.c0;
          scalar_t* out = y + t.row0 * N + col;
          if (bias != nullptr) {
            for (int64_t r = 0; r < rows; ++r) std::copy(bias + col, bias + col + width, out + r * N);
          }
          gemm<scalar_t, acc_t>(false, true, rows, width, k, xb, K, w + col * K, K, bias != nullptr ? 1 : 0, out, N);
        }
        if (n < seg && t.c1 == n) {
          for (int64_t s = 0; s < S; ++s) fill_block(y + t.row0 * N + s * seg + n, rows, seg - n, N, scalar_t(0));
        }
        return;
      }
    }
    // The GEMM output: in place for fp32 / fp64, an fp32 scratch block of the tile's rows for half types.
    Scratch<acc_t> block(half && has_gemm ? rows * N : 0);
    acc_t* h = nullptr;
    int64_t h_row0 = 0;
    if constexpr (half) {
      h = block.get();
      h_row0 = t.row0;
    } else {
      h = gemm_dst;
    }
    if (has_gemm) {
      for (int64_t s = 0; s < calls; ++s) {
        const int64_t col = s * seg + t.c0;
        gemm<scalar_t, acc_t>(false, true, rows, width, k, xb, K, w + col * K, K, 0, h + (t.row0 - h_row0) * N + col,
                              N);
      }
    }
    std::vector<acc_t> buf(static_cast<size_t>(std::max<int64_t>(t.c1 - t.c0, 1)));
    fwd_epilogue<scalar_t, acc_t, acc_t>(l, t, has_gemm, h, h_row0, bias, residual, scales, gelu_on, pre, y,
                                         buf.data());
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ragged_linear_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& row_scale, c10::IntArrayRef sizes,
    const at::Tensor& in_widths, const at::Tensor& out_widths, int64_t segments, bool gelu_on, bool save_pre) {
  const Layout l = check_layout(x, weight, sizes, in_widths, out_widths, segments, row_scale, kFwdName);
  if (present(bias)) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == l.n_max && bias->scalar_type() == x.scalar_type() &&
                    bias->device() == x.device() && bias->is_contiguous(),
                kFwdName, ": bias must be a contiguous (", l.n_max, ",) ", x.scalar_type(),
                " tensor on x's device, got ", bias->sizes(), " ", bias->scalar_type());
  }
  check_like(residual, "residual", l.out_shape, x.scalar_type(), kFwdName);
  TORCH_CHECK(!present(row_scale) || present(residual), kFwdName, ": row_scale needs a residual");

  at::Tensor y = at::empty(l.out_shape, x.options());
  at::Tensor pre = save_pre ? at::empty(l.out_shape, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kFwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> b = values_of<acc_t>(bias);  // N_max values, once
    const std::vector<acc_t> scales = values_of<acc_t>(row_scale);
    fwd_kernel<scalar_t, acc_t>(l, x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                                b.empty() ? nullptr : b.data(),
                                present(residual) ? residual->const_data_ptr<scalar_t>() : nullptr,
                                scales.empty() ? nullptr : scales.data(), gelu_on,
                                save_pre ? pre.mutable_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>());
  });
  return {y, pre};
}

namespace {

// ---------------------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
struct BwdArgs {
  const Layout& l;
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* w;
  scalar_t* dx;
  acc_t* dw;   // N_max x K_max, acc dtype (an fp32 buffer for half types)
  double* db;  // N_max fp64 sums, or null without a bias
  bool has_residual, write_dpre;
};

// dx of one row block: sum over segments of dpre_s @ W_s into x's first k_g columns, zeros beyond k_g. dps is the
// block's dpre (or dy) at its first row, leading dimension ld. A group of full segment width reads all segments as
// one GEMM (its dpre columns and W rows are contiguous then). Half types sum in an fp32 block, rounded once.
template <typename scalar_t, typename acc_t>
void dx_block(const BwdArgs<scalar_t, acc_t>& a, const RowTask& t, const scalar_t* dps, int64_t ld) {
  constexpr bool half = !std::is_same_v<scalar_t, acc_t>;
  const Layout& l = a.l;
  const int64_t K = l.k_max, k = l.in.widths[t.g], n = l.out.widths[t.g], rows = t.row1 - t.row0;
  scalar_t* dxb = a.dx + t.row0 * K;
  if (k == 0 || n == 0) {  // no product: x gets no gradient from this group
    fill_block(dxb, rows, K, K, scalar_t(0));
    return;
  }
  Scratch<acc_t> block(half ? rows * k : 0);
  acc_t* out = nullptr;
  int64_t out_ld = K;
  if constexpr (half) {
    out = block.get();
    out_ld = k;
  } else {
    out = dxb;
  }
  if (n == l.seg_width) {
    gemm<scalar_t, acc_t>(false, false, rows, k, l.n_max, dps, ld, a.w, K, 0, out, out_ld);
  } else {
    for (int64_t s = 0; s < l.segments; ++s) {
      gemm<scalar_t, acc_t>(false, false, rows, k, n, dps + s * l.seg_width, ld, a.w + s * l.seg_width * K, K,
                            s == 0 ? 0 : 1, out, out_ld);
    }
  }
  if constexpr (half) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < k; ++j) dxb[r * K + j] = static_cast<scalar_t>(out[r * k + j]);
    }
  }
  fill_block(dxb + k, rows, K - k, K, scalar_t(0));
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

template <typename scalar_t>
void bwd_fused(const BwdArgs<scalar_t, scalar_t>& a, const scalar_t* pre_p, const scalar_t* scales, scalar_t* dres_p) {
  const Layout& l = a.l;
  const int64_t N = l.n_max, K = l.k_max, S = l.segments, seg = l.seg_width;
  const std::vector<RowTask> blocks = row_tasks(l, kFusedBlock);
  if (blocks.empty()) {
    std::fill(a.dw, a.dw + N * K, scalar_t(0));
    if (a.db != nullptr) std::fill(a.db, a.db + N, 0.0);
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
  Scratch<scalar_t> partial(chunks * N * K);
  std::vector<double> db_part(a.db != nullptr ? chunks * N : 0, 0.0);
  run_tasks(ccost, [&](int64_t c) {
    scalar_t* part = partial.get() + c * N * K;
    std::fill(part, part + N * K, scalar_t(0));  // here rather than at allocation: the owning thread touches it first
    Scratch<scalar_t> scratch(a.write_dpre ? kFusedBlock * N : 0);
    for (int64_t b = bounds[c]; b < bounds[c + 1]; ++b) {
      const RowTask& t = blocks[b];
      const int64_t k = l.in.widths[t.g], n = l.out.widths[t.g], rows = t.row1 - t.row0;
      if (a.has_residual || a.write_dpre) {
        bwd_prologue<scalar_t, scalar_t>(l, t, a.dy, pre_p, scales, dres_p, a.write_dpre ? scratch.get() : nullptr,
                                         t.row0);
      }
      const scalar_t* src = a.write_dpre ? scratch.get() : a.dy + t.row0 * N;  // row stride N either way
      dx_block(a, t, src, N);
      if (n == 0) continue;
      if (k > 0) {
        for (int64_t s = 0; s < S; ++s) {
          gemm<scalar_t, scalar_t>(true, false, n, k, rows, src + s * seg, N, a.x + t.row0 * K, K, 1,
                                   part + s * seg * K, K);
        }
      }
      if (a.db != nullptr) {
        for (int64_t s = 0; s < S; ++s) column_sums(src + s * seg, rows, n, N, db_part.data() + c * N + s * seg);
      }
    }
  });
  // dW = sum of the partials in chunk order (each element the same order whatever the thread splitting W's rows).
  const scalar_t* part_p = partial.get();
  at::parallel_for(0, N, 8, [&](int64_t r0, int64_t r1) {
    const int64_t len = (r1 - r0) * K;
    scalar_t* out = a.dw + r0 * K;
    std::copy(part_p + r0 * K, part_p + r0 * K + len, out);
    for (int64_t c = 1; c < chunks; ++c) {
      const scalar_t* p = part_p + c * N * K + r0 * K;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) out[i] += p[i];
    }
  });
  if (a.db != nullptr) {
    for (int64_t j = 0; j < N; ++j) {
      double v = 0;
      for (int64_t c = 0; c < chunks; ++c) v += db_part[c * N + j];
      a.db[j] = v;
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
//   writing and re-reading a rows x N_max dpre buffer. fp16 / bf16 products accumulate into the fp32 tile.
constexpr int64_t kStripRows = 2048;  // a group of up to 2048 rows is one GEMM per tile (S3: 1088 rows)

template <typename scalar_t, typename acc_t>
void bwd_tiled(const BwdArgs<scalar_t, acc_t>& a, const scalar_t* pre_p, const acc_t* scales, scalar_t* dres_p) {
  const Layout& l = a.l;
  const int64_t N = l.n_max, K = l.k_max;

  const std::vector<RowTask> tasks = row_tasks(l, row_block(l.rows));
  std::vector<double> cost;
  for (const RowTask& t : tasks) {
    const double rows = static_cast<double>(t.row1 - t.row0);
    cost.push_back(rows * (static_cast<double>(l.in.widths[t.g] * l.out.widths[t.g] * l.segments) + N + K));
  }
  const auto dx_task = [&](int64_t i) {
    const RowTask& t = tasks[i];
    const int64_t rows = t.row1 - t.row0;
    Scratch<scalar_t> scratch(a.write_dpre ? rows * N : 0);
    if (a.has_residual || a.write_dpre) {
      bwd_prologue<scalar_t, acc_t>(l, t, a.dy, pre_p, scales, dres_p, a.write_dpre ? scratch.get() : nullptr,
                                    t.row0);
    }
    dx_block(a, t, a.write_dpre ? scratch.get() : a.dy + t.row0 * N, N);
  };

  std::vector<WeightTask> wtasks;
  std::vector<double> wcost;
  const int64_t tile_rows = weight_tile_rows(l.segments, l.seg_width);
  const int64_t tile_cols = weight_tile_cols(l.segments * ((l.seg_width + tile_rows - 1) / tile_rows), K);
  for (int64_t s = 0; s < l.segments; ++s) {
    for (int64_t j0 = 0; j0 < l.seg_width; j0 += tile_rows) {
      for (int64_t c0 = 0; c0 < K; c0 += tile_cols) {
        WeightTask t{s, j0, std::min(j0 + tile_rows, l.seg_width), c0, std::min(c0 + tile_cols, K)};
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
    acc_t* tile = a.dw + w0 * K + t.c0;
    fill_block(tile, t.j1 - t.j0, t.c1 - t.c0, K, acc_t(0));
    double* dbp = a.db != nullptr && t.c0 == 0 ? a.db + w0 : nullptr;
    if (dbp != nullptr) std::fill(dbp, dbp + (t.j1 - t.j0), 0.0);
    std::optional<Scratch<scalar_t>> strip;
    for (int64_t g = 0; g < l.in.num_groups(); ++g) {
      const int64_t rows = l.in.rows(g), row0 = l.in.row_start[g];
      const int64_t n = std::min(l.out.widths[g], t.j1) - t.j0, k = std::min(l.in.widths[g], t.c1) - t.c0;
      if (rows == 0 || n <= 0) continue;
      // Strips of the group's rows: all of them when dpre is dy, else kStripRows at a time (equal parts).
      const int64_t parts = a.write_dpre ? (rows + kStripRows - 1) / kStripRows : 1;
      for (int64_t p = 0; p < parts; ++p) {
        const int64_t r0 = row0 + rows * p / parts, r1 = row0 + rows * (p + 1) / parts;
        const scalar_t* dps = nullptr;
        int64_t ld = N;
        if (a.write_dpre) {
          if (!strip) strip.emplace(strip_rows * (t.j1 - t.j0));
          dpre_strip<scalar_t, acc_t>(l, r0, r1, w0, n, a.dy, pre_p, scales, strip->get());
          dps = strip->get();
          ld = n;
        } else {
          dps = a.dy + r0 * N + w0;
        }
        if (k > 0) gemm<scalar_t, acc_t>(true, false, n, k, r1 - r0, dps, ld, a.x + r0 * K + t.c0, K, 1, tile, K);
        if (dbp != nullptr) column_sums(dps, r1 - r0, n, ld, dbp);
      }
    }
  };

  const int64_t nx = static_cast<int64_t>(cost.size());
  std::vector<double> all(cost);
  all.insert(all.end(), wcost.begin(), wcost.end());
  run_tasks(all, [&](int64_t i) { i < nx ? dx_task(i) : dw_task(i - nx); });
}

template <typename scalar_t>
void bwd_kernel(const Layout& l, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                const std::optional<at::Tensor>& pre, const std::optional<at::Tensor>& row_scale, bool gelu_on,
                bool has_bias, bool has_residual, at::Tensor& dx, at::Tensor& dw, at::Tensor& db, at::Tensor& dres) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool half = !std::is_same_v<scalar_t, acc_t>;
  const std::vector<acc_t> scales = values_of<acc_t>(row_scale);
  const acc_t* sp = scales.empty() ? nullptr : scales.data();
  const scalar_t* pre_p = gelu_on ? pre->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dres_p = has_residual ? dres.mutable_data_ptr<scalar_t>() : nullptr;
  // fp32 accumulator for half types (products accumulate in fp32, one rounding at the end); fp32 / fp64 in place.
  Scratch<acc_t> dw_acc(half ? l.n_max * l.k_max : 0);
  std::vector<double> db_sum(has_bias ? l.n_max : 0);
  acc_t* dw_p = nullptr;
  if constexpr (half) {
    dw_p = dw_acc.get();
  } else {
    dw_p = dw.mutable_data_ptr<scalar_t>();
  }
  const BwdArgs<scalar_t, acc_t> args{l, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                      weight.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), dw_p,
                                      has_bias ? db_sum.data() : nullptr, has_residual,
                                      gelu_on || present(row_scale)};
  if constexpr (!half) {
    if (l.n_max * l.k_max <= kFusedMaxWeight) {
      bwd_fused<scalar_t>(args, pre_p, sp, dres_p);
    } else {
      bwd_tiled<scalar_t, acc_t>(args, pre_p, sp, dres_p);
    }
  } else {
    bwd_tiled<scalar_t, acc_t>(args, pre_p, sp, dres_p);
    scalar_t* out = dw.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, l.n_max * l.k_max, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) out[i] = static_cast<scalar_t>(dw_p[i]);
    });
  }
  scalar_t* dbp = has_bias ? db.mutable_data_ptr<scalar_t>() : nullptr;
  for (size_t j = 0; j < db_sum.size(); ++j) dbp[j] = static_cast<scalar_t>(db_sum[j]);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ragged_linear_bwd_cpu(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& pre,
    const std::optional<at::Tensor>& row_scale, c10::IntArrayRef sizes, const at::Tensor& in_widths,
    const at::Tensor& out_widths, int64_t segments, bool gelu_on, bool has_bias, bool has_residual) {
  const Layout l = check_layout(x, weight, sizes, in_widths, out_widths, segments, row_scale, kBwdName);
  TORCH_CHECK(dy_in.defined(), kBwdName, ": dy must be a tensor, got None");
  const at::Tensor dy = dy_in.contiguous();
  check_like(dy, "dy", l.out_shape, x.scalar_type(), kBwdName);
  TORCH_CHECK(!gelu_on || present(pre), kBwdName, ": gelu=True needs the saved pre-activation `pre`");
  if (gelu_on) check_like(pre, "pre", l.out_shape, x.scalar_type(), kBwdName);

  at::Tensor dres = has_residual ? at::empty(l.out_shape, x.options()) : at::empty({0}, x.options());
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw = at::empty({l.n_max, l.k_max}, weight.options());
  at::Tensor db = at::empty({has_bias ? l.n_max : 0}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kBwdName, [&] {
    bwd_kernel<scalar_t>(l, dy, x, weight, pre, row_scale, gelu_on, has_bias, has_residual, dx, dw, db, dres);
  });
  return {dx, dw, db, dres};
}

// ---------------------------------------------------------------------------------------------------------------------
// The public op: argument checks, autograd, registration
// ---------------------------------------------------------------------------------------------------------------------
namespace {

// "torch.float32", as Python prints dtypes (the messages match resnas_kernels.ops.ragged_linear's).
std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

// "(4, 3, 6)" / "(6,)", as Python prints shapes.
std::string shape_str(c10::IntArrayRef shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << (shape.size() == 1 ? ",)" : ")");
  return s.str();
}

void check_public_float(const at::Tensor& t, const char* name, int64_t min_dim) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), name, " must have dtype in ['torch.float32', 'torch.float16', "
                   "'torch.bfloat16', 'torch.float64'], got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() >= min_dim, name, " must have at least ", min_dim, " dims, got shape ",
                    shape_str(t.sizes()));
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (shape ", shape_str(t.sizes()), ", strides ",
                    shape_str(t.strides()), "); call .contiguous() first");
}

void check_same_device(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " must be on the same device as x: x is on ", x.device(), ", ",
                    name, " is on ", t.device());
}

// Everything `resnas_kernels.ragged_linear` promises to check, with its messages; no widths values are read (the
// kernels read and check those: CPU tensors here). Returns whether the activation is GELU.
bool check_public_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& row_scale,
                       c10::IntArrayRef sizes, const at::Tensor& in_widths, const at::Tensor& out_widths,
                       int64_t segments, std::optional<c10::string_view> activation) {
  check_public_float(x, "x", 2);
  TORCH_CHECK_VALUE(segments >= 1, "segments must be an int >= 1, got ", segments);
  const int64_t k_max = x.size(-1);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == k_max && weight.size(0) >= 1 && weight.size(1) >= 1,
                    "weight must have shape (N_max >= 1, K_max) with K_max = x.shape[-1] = ", k_max,
                    " >= 1, got ", shape_str(weight.sizes()));
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype ",
                   dtype_name(x.scalar_type()), ", got ", dtype_name(weight.scalar_type()),
                   " (cast it before the call)");
  check_same_device(x, weight, "weight");
  TORCH_CHECK_VALUE(weight.is_contiguous(), "weight must be contiguous (row-major (N_max, K_max)), got strides ",
                    shape_str(weight.strides()));
  const int64_t n_max = weight.size(0);
  TORCH_CHECK_VALUE(n_max % segments == 0, "segments=", segments, " must divide N_max = weight.shape[0] = ", n_max);
  if (present(bias)) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n_max, "bias must have shape (", n_max,
                      ",) (N_max = weight.shape[0]), got ", shape_str(bias->sizes()));
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype ", dtype_name(x.scalar_type()),
                     ", got ", dtype_name(bias->scalar_type()));
    check_same_device(x, *bias, "bias");
    TORCH_CHECK_VALUE(bias->is_contiguous(), "bias must be contiguous");
  }
  TORCH_CHECK_VALUE(!sizes.empty(), "sizes must name at least one group, got an empty sequence");
  int64_t samples = 0;
  for (size_t g = 0; g < sizes.size(); ++g) {
    TORCH_CHECK_VALUE(sizes[g] >= 0, "sizes[", g, "] must be >= 0, got ", sizes[g]);
    samples += sizes[g];
  }
  TORCH_CHECK_VALUE(samples == x.size(0), "sum of group sizes (", samples, ", sizes=", shape_str(sizes),
                    ") must equal the batch size of x (dim 0: ", x.size(0), ")");
  const int64_t groups = static_cast<int64_t>(sizes.size());
  check_widths_tensor(in_widths, groups, x, kOpName, "in_widths", "x");
  check_widths_tensor(out_widths, groups, x, kOpName, "out_widths", "x");
  if (present(residual)) {
    check_public_float(*residual, "residual", 2);
    check_same_device(x, *residual, "residual");
    std::vector<int64_t> out_shape = x.sizes().vec();
    out_shape.back() = n_max;
    TORCH_CHECK_VALUE(residual->sizes() == c10::IntArrayRef(out_shape) && residual->scalar_type() == x.scalar_type(),
                      "residual must have the output's shape ", shape_str(out_shape), " and x's dtype ",
                      dtype_name(x.scalar_type()), ", got ", shape_str(residual->sizes()), " ",
                      dtype_name(residual->scalar_type()));
  }
  if (present(row_scale)) {
    TORCH_CHECK_VALUE(row_scale->dim() == 1 && row_scale->size(0) == x.size(0), "row_scale must have shape (",
                      x.size(0), ",) (one scale per sample), got ", shape_str(row_scale->sizes()));
    TORCH_CHECK_TYPE(row_scale->scalar_type() == x.scalar_type() || row_scale->scalar_type() == at::kFloat,
                     "row_scale must have dtype ", dtype_name(x.scalar_type()), " or torch.float32, got ",
                     dtype_name(row_scale->scalar_type()));
    check_same_device(x, *row_scale, "row_scale");
    TORCH_CHECK_VALUE(row_scale->is_contiguous(), "row_scale must be contiguous");
  }
  const bool gelu_on = activation.has_value() && *activation == "gelu";
  TORCH_CHECK_VALUE(!activation.has_value() || gelu_on, "activation must be None or 'gelu', got '",
                    activation.has_value() ? std::string(*activation) : std::string(), "'");
  if (present(row_scale)) {
    TORCH_CHECK_VALUE(present(residual),
                      "row_scale needs a residual: it scales the branch added to the residual (drop-path)");
    TORCH_CHECK_VALUE(!row_scale->requires_grad(),
                      "row_scale must not require grad: ragged_linear treats it as a constant (detach it)");
  }
  return gelu_on;
}

using FwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                                 c10::IntArrayRef, const at::Tensor&, const at::Tensor&, int64_t, bool,
                                                 bool);
using BwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, c10::IntArrayRef, const at::Tensor&, const at::Tensor&, int64_t, bool, bool,
    bool);

// The kernels through the dispatcher: a fake tensor (torch.compile) reaches their Python fake implementations.
const c10::TypedOperatorHandle<FwdFn>& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("resnas::ext_ragged_linear_fwd", "").typed<FwdFn>();
  return op;
}

const c10::TypedOperatorHandle<BwdFn>& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("resnas::ext_ragged_linear_bwd", "").typed<BwdFn>();
  return op;
}

class RaggedLinearFunction : public torch::autograd::Function<RaggedLinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                            const std::optional<at::Tensor>& row_scale, c10::IntArrayRef sizes,
                            const at::Tensor& in_widths, const at::Tensor& out_widths, int64_t segments, bool gelu_on) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // GELU's backward needs its input: saved (one store of the output's size) rather than recomputed (a GEMM).
    auto [y, pre] = fwd_op().call(x, weight, bias, residual, row_scale, sizes, in_widths, out_widths, segments,
                                  gelu_on, gelu_on);
    ctx->save_for_backward({x, weight, pre, present(row_scale) ? *row_scale : at::Tensor(), in_widths, out_widths});
    ctx->saved_data["sizes"] = sizes.vec();
    ctx->saved_data["segments"] = segments;
    ctx->saved_data["gelu"] = gelu_on;
    ctx->saved_data["has_bias"] = present(bias);
    ctx->saved_data["has_residual"] = present(residual);
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(), "ragged_linear: double backward is not supported");
    const auto saved = ctx->get_saved_variables();
    const bool gelu_on = ctx->saved_data["gelu"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector();
    const std::optional<at::Tensor> pre = gelu_on ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    const std::optional<at::Tensor> row_scale = saved[3].defined() ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dx, dw, db, dres] = bwd_op().call(grads[0], saved[0], saved[1], pre, row_scale, sizes, saved[4], saved[5],
                                            ctx->saved_data["segments"].toInt(), gelu_on, has_bias, has_residual);
    // One gradient per forward argument: x, weight, bias, residual; none for row_scale and the metadata.
    return {dx, dw, has_bias ? db : at::Tensor(), has_residual ? dres : at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

bool requires_grad(const std::optional<at::Tensor>& t) { return present(t) && t->requires_grad(); }

at::Tensor ragged_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& residual,
                                  const std::optional<at::Tensor>& row_scale, c10::IntArrayRef sizes,
                                  const at::Tensor& in_widths, const at::Tensor& out_widths, int64_t segments,
                                  std::optional<c10::string_view> activation) {
  const bool gelu_on =
      check_public_args(x, weight, bias, residual, row_scale, sizes, in_widths, out_widths, segments, activation);
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || weight.requires_grad() || requires_grad(bias) || requires_grad(residual))) {
    at::AutoDispatchBelowADInplaceOrView guard;  // no autograd node to record
    return std::get<0>(fwd_op().call(x, weight, bias, residual, row_scale, sizes, in_widths, out_widths, segments,
                                     gelu_on, false));
  }
  return RaggedLinearFunction::apply(x, weight, bias, residual, row_scale, sizes, in_widths, out_widths, segments,
                                     gelu_on);
}

// Below autograd (inference mode, or a trace that has already handled autograd): the checks and the forward.
at::Tensor ragged_linear_forward_only(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                      const std::optional<at::Tensor>& row_scale, c10::IntArrayRef sizes,
                                      const at::Tensor& in_widths, const at::Tensor& out_widths, int64_t segments,
                                      std::optional<c10::string_view> activation) {
  const bool gelu_on =
      check_public_args(x, weight, bias, residual, row_scale, sizes, in_widths, out_widths, segments, activation);
  return std::get<0>(fwd_op().call(x, weight, bias, residual, row_scale, sizes, in_widths, out_widths, segments,
                                   gelu_on, false));
}

}  // namespace
}  // namespace resnas

TORCH_LIBRARY_IMPL(resnas, CPU, m) {
  m.impl("ext_ragged_linear_fwd", &resnas::ragged_linear_fwd_cpu);
  m.impl("ext_ragged_linear_bwd", &resnas::ragged_linear_bwd_cpu);
}

TORCH_LIBRARY_IMPL(resnas, Autograd, m) { m.impl("ragged_linear", &resnas::ragged_linear_autograd); }

TORCH_LIBRARY_IMPL(resnas, CompositeExplicitAutograd, m) {
  m.impl("ragged_linear", &resnas::ragged_linear_forward_only);
}
