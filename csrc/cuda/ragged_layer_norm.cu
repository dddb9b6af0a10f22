// Ragged LayerNorm on CUDA: resnas::ext_ragged_layer_norm_fwd / _bwd (schema and semantics in ../ragged_layer_norm.h;
// the schema itself is defined by csrc/registration.cpp, this file only adds the CUDA implementations).
//
// Layout of the work:
// - Forward: one warp per row, 4 warps per block. For C_max <= 1024 each lane keeps its columns in registers
//   (`fwd_warp_kernel`): load x (+ residual) once, warp-shuffle the sum, then the centred sums (corrected two-pass
//   variance, see resnas_kernels/ops/ragged_layer_norm/__init__.py; the backward re-centres xhat likewise), then
//   write y. Wider rows (and fp64 rows wider than 256) use `fwd_wide_kernel`,
//   which re-reads the row from global memory (L1/L2) in each pass instead; the backward likewise.
// - Loads and stores are 16-byte vectors when C_max and every pointer allow it (VEC > 1), else scalar (VEC = 1).
//   A vector that straddles the width is loaded whole (it lies inside the row of C_max elements) and masked.
// - Backward: each warp handles a fixed run of `rows_per_warp` rows (a function of the row count only), keeps its
//   dweight/dbias sums in registers and writes them as one partial row; `sum_partials_kernel` then adds the partial
//   rows in a fixed order. No float atomics: dweight/dbias are bitwise reproducible run to run.
// - Group lookup: the group row ends are host ints (static: they fix the grids) passed by value (a `LaunchGroups`
//   kernel argument of at most kMaxGroupsPerLaunch groups, read with compile-time indices so they stay in the constant
//   bank); the widths are device metadata (an int32 tensor) that each warp loads from global memory and clamps to
//   [0, C_max]: the host never reads them (no sync; a CUDA graph replays with new widths), and no value can address
//   memory outside the tensors. Batches with more groups are processed with one launch per run of
//   kMaxGroupsPerLaunch groups (groups own contiguous rows). Grids cover every row of the static bounds; rows of
//   width 0 only write zeros.
// - Statistics and all arithmetic are fp32 (fp64 for fp64 inputs); weight/bias are converted to that dtype on the
//   host first (a no-op for fp32 parameters).
// - w * dy is rounded once with __fmul_rn / __dmul_rn so that its sum (c2) and its use in dx cancel exactly where they
//   should (width-1 or constant rows, whose rstd is huge); an FMA-contracted copy would not.
//
// Headers: only c10/cuda ones. ATen/cuda/CUDAContext.h (at::cuda::getCurrentCUDAStream, the same function as
// c10::cuda::getCurrentCUDAStream) pulls in cusparse.h / cublas headers, which a minimal CUDA toolkit lacks.
//
// This file is compiled (sm_80, sm_90) on the GPU-less build host but was not run there; the GPU test tier
// (tests/test_ragged_layer_norm.py, `gpu` marker) checks it against the reference.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

#include "../ragged_layer_norm.h"

namespace resnas {
namespace {

constexpr const char* kFwdName = "ext_ragged_layer_norm_fwd";
constexpr const char* kBwdName = "ext_ragged_layer_norm_bwd";

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpSize * kWarpsPerBlock;
constexpr int kMaxGroupsPerLaunch = 32;
// Widest C_max of the register-cached kernels: 32 values per lane (1024 columns) for fp32 arithmetic; fp64 rows
// wider than 256 (8 values per lane) would spill, so they take the wide kernels (fp64 is for gradcheck, not speed).
template <typename acc_t>
constexpr int64_t register_max_cols() {
  return sizeof(acc_t) == 8 ? 8 * kWarpSize : 32 * kWarpSize;
}

// The groups of one launch. Rows [row_begin, row_end[num_groups - 1]) are covered; group g of the launch ends at
// row_end[g] (absolute row index) and uses widths[g] columns (device memory, clamped to [0, bound]).
struct LaunchGroups {
  int64_t row_begin;
  int64_t row_end[kMaxGroupsPerLaunch];
  const int32_t* widths;  // the launch's first group's entry of the widths tensor
  int32_t num_groups;
  int32_t bound;          // C_max: the widest a row can be
};

// Width of `row`: that of the first group of the launch whose end lies beyond the row (empty groups end where they
// start, so they are never picked), clamped to [0, C_max]. The unrolled loop uses constant indices, which keeps the
// row ends in the parameter space; the one width load per row hits L1 / L2 after the first warp of the group.
__device__ __forceinline__ int row_width(const LaunchGroups& groups, int64_t row) {
  int group = 0;
#pragma unroll
  for (int g = kMaxGroupsPerLaunch - 1; g >= 0; --g) {
    if (g < groups.num_groups && row < groups.row_end[g]) group = g;
  }
  const int width = __ldg(groups.widths + group);
  return width < 0 ? 0 : (width > groups.bound ? groups.bound : width);
}

// Butterfly sum: every lane ends with the same bits (a + b == b + a), so all lanes agree on mean and rstd.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float inv_sqrt(float v) { return 1.0f / sqrtf(v); }
__device__ __forceinline__ double inv_sqrt(double v) { return 1.0 / sqrt(v); }
// Variance from the mean square of d = v - mean and the mean of d (`shift`, the rounding error of mean): the corrected
// two-pass formula. Never negative, though rounding can make the difference so when every d is equal.
template <typename T>
__device__ __forceinline__ T centred_var(T mean_sq, T shift) {
  const T var = mean_sq - shift * shift;
  return var > static_cast<T>(0) ? var : static_cast<T>(0);
}
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T val[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// ---------------------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------------------
// Lane `lane` owns the VEC-wide column packs i * 32 + lane, i < PACKS, i.e. columns [(i * 32 + lane) * VEC, + VEC).
// Requires C_max <= PACKS * 32 * VEC and C_max % VEC == 0.
template <typename scalar_t, int VEC, int PACKS, bool HAS_RESIDUAL>
__global__ void __launch_bounds__(kThreads)
    fwd_warp_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual, scalar_t* __restrict__ y,
                    scalar_t* __restrict__ z, const at::opmath_type<scalar_t>* __restrict__ weight,
                    const at::opmath_type<scalar_t>* __restrict__ bias, at::opmath_type<scalar_t>* __restrict__ mean_out,
                    at::opmath_type<scalar_t>* __restrict__ rstd_out, int64_t C, int64_t num_rows,
                    const LaunchGroups groups, at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t local_row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (local_row >= num_rows) return;  // the whole warp leaves together: no shuffle misses a lane
  const int64_t row = groups.row_begin + local_row;
  const int width = row_width(groups, row);
  const int64_t off = row * C;

  acc_t v[PACKS][VEC];
  acc_t sum = 0;
#pragma unroll
  for (int i = 0; i < PACKS; ++i) {
    const int64_t col = static_cast<int64_t>(i * kWarpSize + lane) * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[i][k] = 0;
    if (col < width) {
      const Pack<scalar_t, VEC> xp = load_pack<scalar_t, VEC>(x + off + col);
      Pack<scalar_t, VEC> rp;
      if (HAS_RESIDUAL) rp = load_pack<scalar_t, VEC>(residual + off + col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (col + k < width) {
          v[i][k] = static_cast<acc_t>(xp.val[k]);
          // z is normalised as stored (rounded to scalar_t): the backward only sees the stored z.
          if (HAS_RESIDUAL) v[i][k] = static_cast<acc_t>(static_cast<scalar_t>(v[i][k] + static_cast<acc_t>(rp.val[k])));
        }
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum += v[i][k];
    if (HAS_RESIDUAL && col < C) {  // z: x + residual, zeros beyond the width (v is zero there)
      Pack<scalar_t, VEC> zp;
#pragma unroll
      for (int k = 0; k < VEC; ++k) zp.val[k] = static_cast<scalar_t>(v[i][k]);
      store_pack<scalar_t, VEC>(z + off + col, zp);
    }
  }
  const acc_t count = static_cast<acc_t>(width > 0 ? width : 1);
  const acc_t mean = warp_sum(sum) / count;
  acc_t sq = 0, sd = 0;
#pragma unroll
  for (int i = 0; i < PACKS; ++i) {
    const int64_t col = static_cast<int64_t>(i * kWarpSize + lane) * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (col + k < width) {
        const acc_t d = v[i][k] - mean;
        sq += d * d;
        sd += d;
      }
    }
  }
  const acc_t shift = warp_sum(sd) / count;  // the rounding error of mean: corrected two-pass statistics
  const acc_t rstd = width > 0 ? inv_sqrt(centred_var(warp_sum(sq) / count, shift) + eps) : static_cast<acc_t>(0);
#pragma unroll
  for (int i = 0; i < PACKS; ++i) {
    const int64_t col = static_cast<int64_t>(i * kWarpSize + lane) * VEC;
    if (col < C) {
      Pack<scalar_t, VEC> yp;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int64_t c = col + k;
        const acc_t out = c < width ? ((v[i][k] - mean) - shift) * rstd * weight[c] + bias[c] : static_cast<acc_t>(0);
        yp.val[k] = static_cast<scalar_t>(out);
      }
      store_pack<scalar_t, VEC>(y + off + col, yp);
    }
  }
  if (lane == 0) {
    mean_out[row] = width > 0 ? mean : static_cast<acc_t>(0);
    rstd_out[row] = rstd;
  }
}

// Any C_max: lane-strided scalar loops that re-read the row (x + residual is recomputed bit-identically).
template <typename scalar_t, bool HAS_RESIDUAL>
__global__ void __launch_bounds__(kThreads)
    fwd_wide_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual, scalar_t* __restrict__ y,
                    scalar_t* __restrict__ z, const at::opmath_type<scalar_t>* __restrict__ weight,
                    const at::opmath_type<scalar_t>* __restrict__ bias, at::opmath_type<scalar_t>* __restrict__ mean_out,
                    at::opmath_type<scalar_t>* __restrict__ rstd_out, int64_t C, int64_t num_rows,
                    const LaunchGroups groups, at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t local_row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (local_row >= num_rows) return;
  const int64_t row = groups.row_begin + local_row;
  const int64_t width = row_width(groups, row);
  const int64_t off = row * C;
  auto load = [&](int64_t c) {
    acc_t v = static_cast<acc_t>(x[off + c]);
    if (HAS_RESIDUAL) v = static_cast<acc_t>(static_cast<scalar_t>(v + static_cast<acc_t>(residual[off + c])));
    return v;
  };
  acc_t sum = 0;
  for (int64_t c = lane; c < width; c += kWarpSize) sum += load(c);
  const acc_t count = static_cast<acc_t>(width > 0 ? width : 1);
  const acc_t mean = warp_sum(sum) / count;
  acc_t sq = 0, sd = 0;
  for (int64_t c = lane; c < width; c += kWarpSize) {
    const acc_t d = load(c) - mean;
    sq += d * d;
    sd += d;
  }
  const acc_t shift = warp_sum(sd) / count;
  const acc_t rstd = width > 0 ? inv_sqrt(centred_var(warp_sum(sq) / count, shift) + eps) : static_cast<acc_t>(0);
  for (int64_t c = lane; c < C; c += kWarpSize) {
    const bool active = c < width;
    const acc_t v = active ? load(c) : static_cast<acc_t>(0);
    if (HAS_RESIDUAL) z[off + c] = static_cast<scalar_t>(v);
    y[off + c] = static_cast<scalar_t>(active ? ((v - mean) - shift) * rstd * weight[c] + bias[c]
                                              : static_cast<acc_t>(0));
  }
  if (lane == 0) {
    mean_out[row] = width > 0 ? mean : static_cast<acc_t>(0);
    rstd_out[row] = rstd;
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------------------
// Warp `w` of the launch handles rows [w * rows_per_warp, (w + 1) * rows_per_warp) of the launch and writes partial row
// part_base + w (part_cols = C_max columns) of dw_part / db_part.
template <typename scalar_t, int VEC, int PACKS, bool HAS_DZ>
__global__ void __launch_bounds__(kThreads)
    bwd_warp_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ dz, const scalar_t* __restrict__ z,
                    const at::opmath_type<scalar_t>* __restrict__ weight,
                    const at::opmath_type<scalar_t>* __restrict__ mean_in,
                    const at::opmath_type<scalar_t>* __restrict__ rstd_in, scalar_t* __restrict__ dx,
                    at::opmath_type<scalar_t>* __restrict__ dw_part, at::opmath_type<scalar_t>* __restrict__ db_part,
                    int64_t C, int64_t part_cols, int64_t num_rows, int64_t rows_per_warp, int64_t part_base,
                    const LaunchGroups groups) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t first = warp * rows_per_warp;
  if (first >= num_rows) return;  // only warps of the last block can be spare; they own no partial row
  const int64_t last = first + rows_per_warp < num_rows ? first + rows_per_warp : num_rows;

  // Registers per lane: the row's z and dy (zero beyond the width) and the running dweight/dbias sums. xhat and
  // w * dy are recomputed in the second pass (same expressions, same bits) rather than kept, to stay under 255.
  acc_t zv[PACKS][VEC], gv[PACKS][VEC], dw[PACKS][VEC], db[PACKS][VEC];
#pragma unroll
  for (int i = 0; i < PACKS; ++i) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw[i][k] = db[i][k] = 0;
  }
  for (int64_t local_row = first; local_row < last; ++local_row) {
    const int64_t row = groups.row_begin + local_row;
    const int width = row_width(groups, row);
    const int64_t off = row * C;
    const acc_t mean = mean_in[row];
    const acc_t rstd = rstd_in[row];
    acc_t s_x = 0, s_xwg = 0, s_wg = 0;  // sum(xhat), sum(xhat * w * dy), sum(w * dy) over the lane's columns
#pragma unroll
    for (int i = 0; i < PACKS; ++i) {
      const int64_t col = static_cast<int64_t>(i * kWarpSize + lane) * VEC;
#pragma unroll
      for (int k = 0; k < VEC; ++k) zv[i][k] = gv[i][k] = 0;
      if (col < width) {
        const Pack<scalar_t, VEC> zp = load_pack<scalar_t, VEC>(z + off + col);
        const Pack<scalar_t, VEC> gp = load_pack<scalar_t, VEC>(dy + off + col);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          if (col + k < width) {
            zv[i][k] = static_cast<acc_t>(zp.val[k]);
            gv[i][k] = static_cast<acc_t>(gp.val[k]);
            const acc_t xhat = (zv[i][k] - mean) * rstd;
            const acc_t wg = mul_rn(weight[col + k], gv[i][k]);
            s_x += xhat;
            s_xwg += xhat * wg;
            s_wg += wg;
          }
        }
      }
    }
    const acc_t count = static_cast<acc_t>(width > 0 ? width : 1);
    // xhat re-centred on its computed mean, as the forward centres: xhat - shift below.
    const acc_t shift = warp_sum(s_x) / count;
    const acc_t c2 = warp_sum(s_wg) / count;
    const acc_t c1 = warp_sum(s_xwg) / count - shift * c2;
#pragma unroll
    for (int i = 0; i < PACKS; ++i) {
      const int64_t col = static_cast<int64_t>(i * kWarpSize + lane) * VEC;
      if (col < C) {
        Pack<scalar_t, VEC> dzp;
        if (HAS_DZ && col < width) dzp = load_pack<scalar_t, VEC>(dz + off + col);
        Pack<scalar_t, VEC> dxp;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          acc_t out = 0;
          if (col + k < width) {
            const acc_t xhat = (zv[i][k] - mean) * rstd - shift;
            const acc_t wg = mul_rn(weight[col + k], gv[i][k]);
            out = (wg - (xhat * c1 + c2)) * rstd;
            if (HAS_DZ) out += static_cast<acc_t>(dzp.val[k]);
            dw[i][k] += gv[i][k] * xhat;
            db[i][k] += gv[i][k];
          }
          dxp.val[k] = static_cast<scalar_t>(out);
        }
        store_pack<scalar_t, VEC>(dx + off + col, dxp);
      }
    }
  }
  const int64_t part = (part_base + warp) * part_cols;
#pragma unroll
  for (int i = 0; i < PACKS; ++i) {
    const int64_t col = static_cast<int64_t>(i * kWarpSize + lane) * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (col + k < part_cols) {
        dw_part[part + col + k] = dw[i][k];
        db_part[part + col + k] = db[i][k];
      }
    }
  }
}

// Any C_max: the warp accumulates straight into its own partial row (column c is always handled by lane c % 32, so
// every address is read and written by a single thread: no race, no atomics).
template <typename scalar_t, bool HAS_DZ>
__global__ void __launch_bounds__(kThreads)
    bwd_wide_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ dz, const scalar_t* __restrict__ z,
                    const at::opmath_type<scalar_t>* __restrict__ weight,
                    const at::opmath_type<scalar_t>* __restrict__ mean_in,
                    const at::opmath_type<scalar_t>* __restrict__ rstd_in, scalar_t* __restrict__ dx,
                    at::opmath_type<scalar_t>* __restrict__ dw_part, at::opmath_type<scalar_t>* __restrict__ db_part,
                    int64_t C, int64_t part_cols, int64_t num_rows, int64_t rows_per_warp, int64_t part_base,
                    const LaunchGroups groups) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t first = warp * rows_per_warp;
  if (first >= num_rows) return;
  const int64_t last = first + rows_per_warp < num_rows ? first + rows_per_warp : num_rows;
  acc_t* dwp = dw_part + (part_base + warp) * part_cols;
  acc_t* dbp = db_part + (part_base + warp) * part_cols;
  for (int64_t c = lane; c < part_cols; c += kWarpSize) dwp[c] = dbp[c] = 0;
  for (int64_t local_row = first; local_row < last; ++local_row) {
    const int64_t row = groups.row_begin + local_row;
    const int64_t width = row_width(groups, row);
    const int64_t off = row * C;
    const acc_t mean = mean_in[row];
    const acc_t rstd = rstd_in[row];
    acc_t s_x = 0, s_xwg = 0, s_wg = 0;
    for (int64_t c = lane; c < width; c += kWarpSize) {
      const acc_t xhat = (static_cast<acc_t>(z[off + c]) - mean) * rstd;
      const acc_t wg = mul_rn(weight[c], static_cast<acc_t>(dy[off + c]));
      s_x += xhat;
      s_xwg += xhat * wg;
      s_wg += wg;
    }
    const acc_t count = static_cast<acc_t>(width > 0 ? width : 1);
    const acc_t shift = warp_sum(s_x) / count;
    const acc_t c2 = warp_sum(s_wg) / count;
    const acc_t c1 = warp_sum(s_xwg) / count - shift * c2;
    for (int64_t c = lane; c < C; c += kWarpSize) {
      acc_t out = 0;
      if (c < width) {
        const acc_t xhat = (static_cast<acc_t>(z[off + c]) - mean) * rstd - shift;
        const acc_t g = static_cast<acc_t>(dy[off + c]);
        out = (mul_rn(weight[c], g) - (xhat * c1 + c2)) * rstd;
        if (HAS_DZ) out += static_cast<acc_t>(dz[off + c]);
        dwp[c] += g * xhat;
        dbp[c] += g;
      }
      dx[off + c] = static_cast<scalar_t>(out);
    }
  }
}

// out[c] = sum of part[k][c] over k, for c < part_cols (0 for part_cols <= c < C). Thread (tx, ty) sums k = ty, ty + 16,
// ... in order, then the 16 slices are added in ty order: a fixed order whatever the device. blockIdx.y picks dw / db.
constexpr int kSumSlices = 16;
template <typename acc_t>
__global__ void __launch_bounds__(kWarpSize * kSumSlices)
    sum_partials_kernel(const acc_t* __restrict__ dw_part, const acc_t* __restrict__ db_part, int64_t num_parts,
                        int64_t part_cols, int64_t C, acc_t* __restrict__ dw, acc_t* __restrict__ db) {
  __shared__ acc_t slice_sums[kSumSlices][kWarpSize + 1];
  const acc_t* part = blockIdx.y == 0 ? dw_part : db_part;
  acc_t* out = blockIdx.y == 0 ? dw : db;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  acc_t s = 0;
  if (col < part_cols) {
    for (int64_t k = threadIdx.y; k < num_parts; k += kSumSlices) s += part[k * part_cols + col];
  }
  slice_sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < C) {
    acc_t total = 0;
#pragma unroll
    for (int j = 0; j < kSumSlices; ++j) total += slice_sums[j][threadIdx.x];
    out[col] = total;
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------------------
// Calls fn(groups, num_rows) for each run of at most kMaxGroupsPerLaunch consecutive groups that owns at least a row.
// `row_start` (size G + 1) are the groups' first rows; `widths` the device pointer of the int32 (G,) widths tensor.
template <typename Fn>
void for_each_launch(const std::vector<int64_t>& row_start, const int32_t* widths, int64_t C, Fn&& fn) {
  const int64_t G = static_cast<int64_t>(row_start.size()) - 1;
  for (int64_t g0 = 0; g0 < G; g0 += kMaxGroupsPerLaunch) {
    const int64_t g1 = std::min<int64_t>(G, g0 + kMaxGroupsPerLaunch);
    LaunchGroups groups{};
    groups.row_begin = row_start[g0];
    groups.widths = widths + g0;
    groups.num_groups = static_cast<int32_t>(g1 - g0);
    groups.bound = static_cast<int32_t>(std::min<int64_t>(C, std::numeric_limits<int32_t>::max()));
    for (int64_t g = g0; g < g1; ++g) groups.row_end[g - g0] = row_start[g + 1];
    const int64_t num_rows = row_start[g1] - row_start[g0];
    if (num_rows > 0) fn(groups, num_rows);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// VEC for 16-byte accesses when the row length and every pointer allow it, else 1.
template <typename scalar_t>
int pick_vec(int64_t C, std::initializer_list<const void*> ptrs) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (C % kVec != 0) return 1;
  for (const void* p : ptrs) {
    if (p != nullptr && !aligned16(p)) return 1;
  }
  return kVec;
}

// Calls fn(std::integral_constant<int, VEC>, std::integral_constant<int, PACKS>) for the register-cached kernel that
// fits C_max (<= register_max_cols): 8 values per lane up to 256 columns, else 32 (fp32 arithmetic only).
template <typename scalar_t, typename Fn>
void dispatch_vec_packs(int vec, int64_t C, Fn&& fn) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  constexpr int kWideCols = static_cast<int>(register_max_cols<at::opmath_type<scalar_t>>() / kWarpSize);
  const bool narrow = C <= 8 * kWarpSize;
  if (vec == kVec) {
    if (narrow) {
      fn(std::integral_constant<int, kVec>(), std::integral_constant<int, (8 + kVec - 1) / kVec>());
    } else {
      fn(std::integral_constant<int, kVec>(), std::integral_constant<int, (kWideCols + kVec - 1) / kVec>());
    }
  } else {
    if (narrow) {
      fn(std::integral_constant<int, 1>(), std::integral_constant<int, 8>());
    } else {
      fn(std::integral_constant<int, 1>(), std::integral_constant<int, kWideCols>());
    }
  }
}

// Rows per warp in the backward: a function of the row count alone, so partial rows, and the summation order of
// dweight/dbias, do not depend on the device.
int64_t bwd_rows_per_warp(int64_t rows) { return rows <= 32768 ? 8 : 32; }

unsigned int blocks_for(int64_t warps) {
  const int64_t blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "ragged_layer_norm (CUDA): too many rows (", warps,
              ") for one launch");
  return static_cast<unsigned int>(blocks);
}

}  // namespace

LayerNormFwdOut ragged_layer_norm_fwd_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in,
                                           const at::Tensor& weight, const at::Tensor& bias,
                                           c10::IntArrayRef row_counts, const at::Tensor& widths, double eps) {
  detail::check_fwd_args(x_in, residual_in, weight, bias, eps, at::kCUDA, kFwdName);
  check_widths_tensor(widths, static_cast<int64_t>(row_counts.size()), x_in, kFwdName, "widths", "x");
  const std::vector<int64_t> row_start = detail::row_starts(row_counts, x_in.size(0), kFwdName, "x");
  const at::Tensor widths_c = widths.contiguous();
  const bool has_residual = residual_in.has_value() && residual_in->defined();
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor residual = has_residual ? residual_in->contiguous() : at::Tensor();
  const int64_t rows = x.size(0), C = x.size(1);
  const auto stats = acc_dtype(x.scalar_type());
  at::Tensor y = at::empty({rows, C}, x.options());
  at::Tensor z = has_residual ? at::empty({rows, C}, x.options()) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rows}, x.options().dtype(stats));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(stats));
  if (rows == 0) return {y, z, mean, rstd};
  if (C == 0) {  // every width is 0: statistics are 0 by contract, y and z have no element
    mean.zero_();
    rstd.zero_();
    return {y, z, mean, rstd};
  }
  const at::Tensor w = weight.to(stats).contiguous();
  const at::Tensor b = bias.to(stats).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kFwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* r_ptr = has_residual ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
    scalar_t* z_ptr = has_residual ? z.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t* w_ptr = w.const_data_ptr<acc_t>();
    const acc_t* b_ptr = b.const_data_ptr<acc_t>();
    acc_t* mean_ptr = mean.mutable_data_ptr<acc_t>();
    acc_t* rstd_ptr = rstd.mutable_data_ptr<acc_t>();
    const acc_t eps_acc = static_cast<acc_t>(eps);
    for_each_launch(row_start, widths_c.const_data_ptr<int32_t>(), C, [&](const LaunchGroups& groups,
                                                                           int64_t num_rows) {
      const unsigned int blocks = blocks_for(num_rows);  // one warp per row
      if (C > register_max_cols<acc_t>()) {
        if (has_residual) {
          fwd_wide_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
              x_ptr, r_ptr, y_ptr, z_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, C, num_rows, groups, eps_acc);
        } else {
          fwd_wide_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
              x_ptr, r_ptr, y_ptr, z_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, C, num_rows, groups, eps_acc);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      const int vec = pick_vec<scalar_t>(C, {x_ptr, r_ptr, y_ptr, z_ptr});
      dispatch_vec_packs<scalar_t>(vec, C, [&](auto vec_c, auto packs_c) {
        constexpr int kVec = decltype(vec_c)::value;
        constexpr int kPacks = decltype(packs_c)::value;
        if (has_residual) {
          fwd_warp_kernel<scalar_t, kVec, kPacks, true><<<blocks, kThreads, 0, stream>>>(
              x_ptr, r_ptr, y_ptr, z_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, C, num_rows, groups, eps_acc);
        } else {
          fwd_warp_kernel<scalar_t, kVec, kPacks, false><<<blocks, kThreads, 0, stream>>>(
              x_ptr, r_ptr, y_ptr, z_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, C, num_rows, groups, eps_acc);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {y, z, mean, rstd};
}

LayerNormBwdOut ragged_layer_norm_bwd_cuda(const at::Tensor& dy_in, const std::optional<at::Tensor>& dz_in,
                                           const at::Tensor& z_in, const at::Tensor& weight, const at::Tensor& mean_in,
                                           const at::Tensor& rstd_in, c10::IntArrayRef row_counts,
                                           const at::Tensor& widths) {
  detail::check_bwd_args(dy_in, dz_in, z_in, weight, mean_in, rstd_in, at::kCUDA, kBwdName);
  check_widths_tensor(widths, static_cast<int64_t>(row_counts.size()), z_in, kBwdName, "widths", "z");
  const std::vector<int64_t> row_start = detail::row_starts(row_counts, z_in.size(0), kBwdName, "z");
  const at::Tensor widths_c = widths.contiguous();
  const bool has_dz = dz_in.has_value() && dz_in->defined();
  const c10::cuda::OptionalCUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.contiguous(), dy = dy_in.contiguous();
  const at::Tensor dz = has_dz ? dz_in->contiguous() : at::Tensor();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t rows = z.size(0), C = z.size(1);
  const auto stats = acc_dtype(z.scalar_type());
  at::Tensor dx = at::empty({rows, C}, z.options());
  at::Tensor dw = at::empty({C}, z.options().dtype(stats));
  at::Tensor db = at::empty({C}, z.options().dtype(stats));
  // Partial rows span C_max, the static bound (the widths are not read on the host); columns beyond a row's width
  // accumulate nothing and sum to 0.
  const int64_t part_cols = C;
  if (rows == 0 || C == 0) {
    // No column anywhere: dx is empty or all zeros, and so are dweight/dbias.
    dx.zero_();
    dw.zero_();
    db.zero_();
    return {dx, dw.to(weight.scalar_type()), db.to(weight.scalar_type())};
  }
  const int64_t rows_per_warp = bwd_rows_per_warp(rows);
  int64_t num_parts = 0;
  const int32_t* widths_ptr = widths_c.const_data_ptr<int32_t>();
  for_each_launch(row_start, widths_ptr, C, [&](const LaunchGroups&, int64_t num_rows) {
    num_parts += (num_rows + rows_per_warp - 1) / rows_per_warp;
  });
  at::Tensor dw_part = at::empty({num_parts, part_cols}, z.options().dtype(stats));
  at::Tensor db_part = at::empty({num_parts, part_cols}, z.options().dtype(stats));
  const at::Tensor w = weight.to(stats).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), kBwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
    const scalar_t* dz_ptr = has_dz ? dz.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* z_ptr = z.const_data_ptr<scalar_t>();
    const acc_t* w_ptr = w.const_data_ptr<acc_t>();
    const acc_t* mean_ptr = mean.const_data_ptr<acc_t>();
    const acc_t* rstd_ptr = rstd.const_data_ptr<acc_t>();
    scalar_t* dx_ptr = dx.mutable_data_ptr<scalar_t>();
    acc_t* dw_part_ptr = dw_part.mutable_data_ptr<acc_t>();
    acc_t* db_part_ptr = db_part.mutable_data_ptr<acc_t>();
    int64_t part_base = 0;
    for_each_launch(row_start, widths_ptr, C, [&](const LaunchGroups& groups, int64_t num_rows) {
      const int64_t warps = (num_rows + rows_per_warp - 1) / rows_per_warp;
      const unsigned int blocks = blocks_for(warps);
      if (C > register_max_cols<acc_t>()) {
        if (has_dz) {
          bwd_wide_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
              dy_ptr, dz_ptr, z_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr, C, part_cols,
              num_rows, rows_per_warp, part_base, groups);
        } else {
          bwd_wide_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
              dy_ptr, dz_ptr, z_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr, C, part_cols,
              num_rows, rows_per_warp, part_base, groups);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const int vec = pick_vec<scalar_t>(C, {dy_ptr, dz_ptr, z_ptr, dx_ptr});
        dispatch_vec_packs<scalar_t>(vec, C, [&](auto vec_c, auto packs_c) {
          constexpr int kVec = decltype(vec_c)::value;
          constexpr int kPacks = decltype(packs_c)::value;
          if (has_dz) {
            bwd_warp_kernel<scalar_t, kVec, kPacks, true><<<blocks, kThreads, 0, stream>>>(
                dy_ptr, dz_ptr, z_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr, C, part_cols,
                num_rows, rows_per_warp, part_base, groups);
          } else {
            bwd_warp_kernel<scalar_t, kVec, kPacks, false><<<blocks, kThreads, 0, stream>>>(
                dy_ptr, dz_ptr, z_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr, C, part_cols,
                num_rows, rows_per_warp, part_base, groups);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
      part_base += warps;
    });
    const dim3 sum_grid(static_cast<unsigned int>((C + kWarpSize - 1) / kWarpSize), 2);
    const dim3 sum_block(kWarpSize, kSumSlices);
    sum_partials_kernel<acc_t><<<sum_grid, sum_block, 0, stream>>>(dw_part_ptr, db_part_ptr, num_parts, part_cols, C,
                                                                   dw.mutable_data_ptr<acc_t>(),
                                                                   db.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dw.to(weight.scalar_type()), db.to(weight.scalar_type())};
}

}  // namespace resnas

TORCH_LIBRARY_IMPL(resnas, CUDA, m) {
  m.impl("ext_ragged_layer_norm_fwd", &resnas::ragged_layer_norm_fwd_cuda);
  m.impl("ext_ragged_layer_norm_bwd", &resnas::ragged_layer_norm_bwd_cuda);
}
