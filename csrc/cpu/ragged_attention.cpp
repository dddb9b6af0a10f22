// Ragged multi-head attention on CPU: resnas::ext_ragged_attention_fwd / _bwd (schema and semantics in
// ../ragged_attention.h). This is LeViT's CPU inference path, so the forward is the part tuned for speed.
//
// Design and caveats:
// - Work items are (sample, head) pairs of ACTIVE heads only; inactive heads are zero-filled with one ATen call per
//   group. The forward runs the pairs in parallel (at::parallel_for, grain 1 pair). Each pair packs its K as K^T
//   (d_qk x Nk, padded to a multiple of the vector width) and its V (Nk x d_v, padded) into per-thread fp32 (fp64 for
//   fp64) buffers, converting from fp16/bf16 on the way, so every inner loop is unit-stride and in cache; then blocks
//   of kRows query rows go through: scores = Q K^T (register-blocked kRows x 16 accumulators), + bias, row max,
//   exp, row sum, then O = P V (register-blocked again). The whole score row stays in a kRows x Nk buffer (L1).
// - exp: the shared vectorisable `exp_nonpositive` (../ragged.h); libm's expf does not vectorise without
//   -ffast-math and was the bottleneck. fp64 inputs use std::exp (the fp64 path is for checking, not speed).
// - Backward, per pair: recompute S and P = exp(S - lse), dP = dO V^T, dS = P (dP - rowsum(dO * O)), then
//   dQ = scale dS K per block of kRows query rows; dK += scale dS^T Q and dV += P^T dO once per chunk of kBwdChunkRows
//   rows (so each load and store of the dK / dV accumulators serves many rows), same register-blocked micro-kernels.
// - Deterministic bias gradients: backward tasks are (chunk of `chunk` samples, head); a task walks its samples in
//   order and adds dS into its own partial (the table (T) or the shared (Nq, Nk) bias); partials are then summed over
//   chunks in increasing chunk order, per column. The bits depend on the shape and `chunk` only, not on threads.
//   For the table, a task first sums dS over its samples in an (Nq, Nk) buffer, then scatters the sum into its T-wide
//   partial once (part[index[i, j]] += sum[i, j], a scalar loop, in (i, j) order).
// - A table/dense bias of another dtype than the accumulation dtype is converted once per call (the table is tiny;
//   a large dense bias costs one copy).
// - Everything accumulates in fp32 (fp64 for fp64). Results differ from the reference by rounding only.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../ragged_attention.h"

namespace resnas {
namespace {

constexpr const char* kFwdName = "ext_ragged_attention_fwd";
constexpr const char* kBwdName = "ext_ragged_attention_bwd";
constexpr int64_t kRows = 4;  // query rows per block: 4 rows x 16 lanes of accumulators fit the register file

// Lanes of one 512-bit vector. The inner loops have exactly this trip count, so they compile to single vector
// instructions under -march=native (and to two 256-bit halves on AVX2 machines).
template <typename acc_t>
constexpr int64_t kLanes = 64 / static_cast<int64_t>(sizeof(acc_t));

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The micro-kernels below take a compile-time size (KC / NC / MC > 0) for the head dims when the caller knows it: with
// constant trip counts the compiler unrolls the head-dim loops completely (measured: ~20% of the LeViT forward).
//
// Register blocking: kRows rows alone give only 4 independent FMA chains, half of what two FMA units with a 4-cycle
// latency need, so with 32 vector registers (AVX-512) a block also spans kVecs vectors of columns, and the dK / dV
// updates take kUpdateRows rows of M at a time. The blocking never changes the order in which one output element is
// summed, so the results are bit-identical to the unblocked loops. With 16 registers (AVX2: a 16-lane fp32 "vector"
// is two of them) the blocks stay narrower, or the accumulators would spill. Measured with L1-resident operands at the
// LeViT shrink shapes (Intel AVX-512, 1 thread, fp32): 4 x 2 vectors 95-109 GFLOP/s against 87-93 for 4 x 1; 4 x 4 fell
// to 45 (most likely the 16 accumulators no longer stayed in registers; not kept).
#if defined(__AVX512F__)
constexpr int64_t kVecs = 2;
constexpr int64_t kUpdateRows = 8;
#else
constexpr int64_t kVecs = 1;
constexpr int64_t kUpdateRows = 4;
#endif

// C[r][j0 + v W + l] = sum_k A[r][k] * B[k][j0 + v W + l] for r < kRows, v < NV, summed in increasing k.
template <typename acc_t, int64_t NV, int64_t KC>
inline void rows_times_block(const acc_t* __restrict A, int64_t lda, int64_t K_rt, const acc_t* __restrict B,
                             int64_t ncols, acc_t* __restrict C, int64_t j0) {
  constexpr int64_t W = kLanes<acc_t>;
  const int64_t K = KC > 0 ? KC : K_rt;
  acc_t acc[kRows][NV][W];
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < NV; ++v)
#pragma omp simd
      for (int64_t l = 0; l < W; ++l) acc[r][v][l] = 0;
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* b = B + k * ncols + j0;
    for (int64_t r = 0; r < kRows; ++r) {
      const acc_t a = A[r * lda + k];
      for (int64_t v = 0; v < NV; ++v)
#pragma omp simd
        for (int64_t l = 0; l < W; ++l) acc[r][v][l] += a * b[v * W + l];
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < NV; ++v)
#pragma omp simd
      for (int64_t l = 0; l < W; ++l) C[r * ncols + j0 + v * W + l] = acc[r][v][l];
}

// C = A B for kRows rows: C[r][j] = sum_{k < K} A[r][k] * B[k][j] for j < ncols (a multiple of the lane count).
// A: kRows x K with row stride lda; B: K x ncols and C: kRows x ncols, both with row stride ncols. KC / NC: K / ncols
// when known at compile time. Used as S = Q K^T (B = the packed K^T), dP = dO V^T, O = P V and dQ = dS K.
template <typename acc_t, int64_t KC = 0, int64_t NC = 0>
inline void rows_times(const acc_t* __restrict A, int64_t lda, int64_t K_rt, const acc_t* __restrict B,
                       int64_t ncols_rt, acc_t* __restrict C) {
  constexpr int64_t W = kLanes<acc_t>;
  const int64_t ncols = NC > 0 ? NC : ncols_rt;
  int64_t j0 = 0;
  if constexpr (kVecs >= 2) {  // 2 x kRows accumulators: the A broadcasts serve two vectors
    for (; j0 + 2 * W <= ncols; j0 += 2 * W) rows_times_block<acc_t, 2, KC>(A, lda, K_rt, B, ncols, C, j0);
  }
  for (; j0 < ncols; j0 += W) rows_times_block<acc_t, 1, KC>(A, lda, K_rt, B, ncols, C, j0);
}

// M[j + u][c] += sum_{r < rows} P[r][j + u] * X[r][c] for u < NJ, c < mcols: NJ rows of M at a time, so that each
// X vector loaded serves NJ accumulators.
template <typename acc_t, int64_t NJ, int64_t MC>
inline void add_pt_times_x_rows(acc_t* __restrict M, int64_t mcols_rt, int64_t j, const acc_t* __restrict P,
                                int64_t ldp, const acc_t* __restrict X, int64_t rows) {
  constexpr int64_t W = kLanes<acc_t>;
  const int64_t mcols = MC > 0 ? MC : mcols_rt;
  for (int64_t c0 = 0; c0 < mcols; c0 += W) {
    acc_t acc[NJ][W];
    for (int64_t u = 0; u < NJ; ++u)
#pragma omp simd
      for (int64_t l = 0; l < W; ++l) acc[u][l] = M[(j + u) * mcols + c0 + l];
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t* x = X + r * mcols + c0;
      for (int64_t u = 0; u < NJ; ++u) {
        const acc_t p = P[r * ldp + j + u];
#pragma omp simd
        for (int64_t l = 0; l < W; ++l) acc[u][l] += p * x[l];
      }
    }
    for (int64_t u = 0; u < NJ; ++u)
#pragma omp simd
      for (int64_t l = 0; l < W; ++l) M[(j + u) * mcols + c0 + l] = acc[u][l];
  }
}

// M[j][c] += sum_{r < rows} P[r][j] * X[r][c] for j < n, c < mcols (a multiple of the lane count), rows summed in
// increasing r. P: rows x n with row stride ldp; X: rows x mcols; M: n x mcols. Called once per chunk of query rows
// (not per kRows block), so that each load and store of M serves `rows` multiply-adds.
template <typename acc_t, int64_t MC = 0>
inline void add_pt_times_x(acc_t* __restrict M, int64_t mcols, int64_t n, const acc_t* __restrict P, int64_t ldp,
                           const acc_t* __restrict X, int64_t rows) {
  int64_t j = 0;
  for (; j + kUpdateRows <= n; j += kUpdateRows)
    add_pt_times_x_rows<acc_t, kUpdateRows, MC>(M, mcols, j, P, ldp, X, rows);
  for (; j < n; ++j) add_pt_times_x_rows<acc_t, 1, MC>(M, mcols, j, P, ldp, X, rows);
}

// dst[c * ldd + j] = src[j * lds + c] for j < n, c < cols, converted to acc_t. In 16 x 16 tiles, so that the writes
// fill whole cache lines: a row-by-row scatter with a stride of ldd elements was, at the LeViT shrink shapes, more than
// half of the backward's time outside its multiply-add loops.
template <typename scalar_t, typename acc_t>
inline void pack_transposed(const scalar_t* __restrict src, int64_t lds, int64_t n, int64_t cols,
                            acc_t* __restrict dst, int64_t ldd) {
  constexpr int64_t kTile = 16;
  for (int64_t j0 = 0; j0 < n; j0 += kTile) {
    const int64_t j1 = std::min(n, j0 + kTile);
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t c1 = std::min(cols, c0 + kTile);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t j = j0; j < j1; ++j) dst[c * ldd + j] = static_cast<acc_t>(src[j * lds + c]);
    }
  }
}

// Everything a pair needs to find its data. Element strides; q/k/v have unit stride on the head dim.
template <typename scalar_t, typename acc_t>
struct Problem {
  int64_t B, Nq, Nk, H, Dqk, Dv;
  const scalar_t *q, *k, *v;
  int64_t qsb, qsn, qsh, ksb, ksn, ksh, vsb, vsn, vsh;
  acc_t scale;
  const acc_t* table = nullptr;   // (H, T) in acc_t
  int64_t T = 0;
  const int32_t* index = nullptr;  // (Nq, Nk), with the table
  const acc_t* dense = nullptr;    // (1|H|B*H, Nq, Nk) in acc_t
  int64_t dense_lead = 0;          // 1, H or -1 (per sample)
  const int64_t* heads = nullptr;  // active heads per sample

  // s[j] += bias(b, h, i, j) for j < Nk, and returns max_j s[j].
  acc_t add_bias_and_max(acc_t* __restrict s, int64_t b, int64_t h, int64_t i) const {
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    if (dense != nullptr) {  // a dense bias, or the table gathered once per call
      const acc_t* __restrict dr = dense_row(b, h, i);
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < Nk; ++j) {
        const acc_t x = s[j] + dr[j];
        s[j] = x;
        m = x > m ? x : m;
      }
    } else if (table != nullptr) {
      const acc_t* __restrict th = table + h * T;
      const int32_t* __restrict ir = index + i * Nk;
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < Nk; ++j) {
        const acc_t x = s[j] + th[ir[j]];
        s[j] = x;
        m = x > m ? x : m;
      }
    } else {
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < Nk; ++j) m = s[j] > m ? s[j] : m;
    }
    return m;
  }

  const acc_t* dense_row(int64_t b, int64_t h, int64_t i) const {
    const int64_t plane = dense_lead == 1 ? 0 : (dense_lead == -1 ? b * H + h : h);
    return dense + (plane * Nq + i) * Nk;
  }
};

// Per-thread scratch, zero-initialised once, so the padding lanes of the packed K^T / V stay zero.
template <typename acc_t>
struct FwdScratch {
  int64_t nkp, dvp;
  std::vector<acc_t> kt, vm, qb, s, ob;
  FwdScratch(int64_t Nk, int64_t Dqk, int64_t Dv)
      : nkp(round_up(Nk, kLanes<acc_t>)), dvp(round_up(Dv, kLanes<acc_t>)),
        kt(Dqk * nkp), vm(Nk * dvp), qb(kRows * Dqk), s(kRows * nkp), ob(kRows * dvp) {}
};

// kD / kDv: the head dims when known at compile time (0: read them from p).
template <typename scalar_t, typename acc_t, int64_t kD, int64_t kDv>
void fwd_pair(const Problem<scalar_t, acc_t>& p, int64_t b, int64_t h, FwdScratch<acc_t>& w, scalar_t* out,
              acc_t* lse) {
  constexpr int64_t kDvp = kDv > 0 ? (kDv + kLanes<acc_t> - 1) / kLanes<acc_t> * kLanes<acc_t> : 0;
  const int64_t Nq = p.Nq, Nk = p.Nk, nkp = w.nkp;
  const int64_t D = kD > 0 ? kD : p.Dqk, Dv = kDv > 0 ? kDv : p.Dv, dvp = kDvp > 0 ? kDvp : w.dvp;
  acc_t* __restrict kt = w.kt.data();
  acc_t* __restrict vm = w.vm.data();
  const scalar_t* k0 = p.k + b * p.ksb + h * p.ksh;
  const scalar_t* v0 = p.v + b * p.vsb + h * p.vsh;
  pack_transposed(k0, p.ksn, Nk, D, kt, nkp);
  for (int64_t j = 0; j < Nk; ++j)
    for (int64_t c = 0; c < Dv; ++c) vm[j * dvp + c] = static_cast<acc_t>(v0[j * p.vsn + c]);
  acc_t* __restrict qb = w.qb.data();
  acc_t* __restrict s = w.s.data();
  acc_t* __restrict ob = w.ob.data();
  acc_t inv_sum[kRows];
  for (int64_t i0 = 0; i0 < Nq; i0 += kRows) {
    const int64_t rb = std::min(kRows, Nq - i0);
    for (int64_t r = 0; r < kRows; ++r) {
      const scalar_t* qr = p.q + b * p.qsb + (i0 + r) * p.qsn + h * p.qsh;
      for (int64_t c = 0; c < D; ++c) qb[r * D + c] = r < rb ? static_cast<acc_t>(qr[c]) * p.scale : acc_t(0);
    }
    rows_times<acc_t, kD>(qb, D, D, kt, nkp, s);  // rows >= rb are zero: they give zero scores and are never used
    for (int64_t r = 0; r < rb; ++r) {
      acc_t* sr = s + r * nkp;
      const acc_t m = p.add_bias_and_max(sr, b, h, i0 + r);
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < Nk; ++j) {
        const acc_t e = exp_nonpositive(sr[j] - m);
        sr[j] = e;
        sum += e;
      }
      inv_sum[r] = acc_t(1) / sum;
      lse[(b * p.H + h) * Nq + i0 + r] = m + std::log(sum);
    }
    rows_times<acc_t, 0, kDvp>(s, nkp, Nk, vm, dvp, ob);
    for (int64_t r = 0; r < rb; ++r) {
      scalar_t* orow = out + ((b * Nq + i0 + r) * p.H + h) * Dv;
      for (int64_t c = 0; c < Dv; ++c) orow[c] = static_cast<scalar_t>(ob[r * dvp + c] * inv_sum[r]);
    }
  }
}

// Query rows whose P, dS, Q and dO the backward keeps before it updates dK and dV (a multiple of kRows): 64 rows of
// P and dS at Nk = 196 are 2 x 53 KB, L2-resident.
constexpr int64_t kBwdChunkRows = 64;
static_assert(kBwdChunkRows % kRows == 0, "a chunk holds whole row blocks");

template <typename acc_t>
struct BwdScratch {
  int64_t nkp, dp, dvp;
  std::vector<acc_t> kt, km, vt, dk, dv, qs, qp, dob, s, dpm, dq;
  BwdScratch(int64_t Nk, int64_t Dqk, int64_t Dv)
      : nkp(round_up(Nk, kLanes<acc_t>)), dp(round_up(Dqk, kLanes<acc_t>)), dvp(round_up(Dv, kLanes<acc_t>)),
        kt(Dqk * nkp), km(Nk * dp), vt(Dv * nkp), dk(Nk * dp), dv(Nk * dvp), qs(kRows * Dqk),
        qp(kBwdChunkRows * dp), dob(kBwdChunkRows * dvp), s(kBwdChunkRows * nkp), dpm(kBwdChunkRows * nkp), dq(kRows * dp) {}
};

// Bias-gradient sink of one task: where dS goes.
template <typename acc_t>
struct BiasGradSink {
  acc_t* table_part = nullptr;   // (T,) partial of this (chunk, head) task
  acc_t* shared_part = nullptr;  // (Nq, Nk) partial of this (chunk, head) task
  acc_t* per_sample = nullptr;   // (B, H, Nq, Nk) gradient, written directly
};

template <typename scalar_t, typename acc_t, int64_t kD, int64_t kDv>
void bwd_pair(const Problem<scalar_t, acc_t>& p, int64_t b, int64_t h, BwdScratch<acc_t>& w, const scalar_t* dout,
              const scalar_t* out, const acc_t* lse, scalar_t* dq, scalar_t* dk, scalar_t* dv,
              const BiasGradSink<acc_t>& sink) {
  constexpr int64_t W = kLanes<acc_t>;
  constexpr int64_t kDp = kD > 0 ? (kD + W - 1) / W * W : 0, kDvp = kDv > 0 ? (kDv + W - 1) / W * W : 0;
  const int64_t Nq = p.Nq, Nk = p.Nk, H = p.H, nkp = w.nkp;
  const int64_t D = kD > 0 ? kD : p.Dqk, Dv = kDv > 0 ? kDv : p.Dv;
  const int64_t dp = kDp > 0 ? kDp : w.dp, dvp = kDvp > 0 ? kDvp : w.dvp;
  acc_t *__restrict kt = w.kt.data(), *__restrict km = w.km.data(), *__restrict vt = w.vt.data();
  const scalar_t* k0 = p.k + b * p.ksb + h * p.ksh;
  const scalar_t* v0 = p.v + b * p.vsb + h * p.vsh;
  for (int64_t j = 0; j < Nk; ++j)
    for (int64_t c = 0; c < D; ++c) km[j * dp + c] = static_cast<acc_t>(k0[j * p.ksn + c]);
  pack_transposed(k0, p.ksn, Nk, D, kt, nkp);
  pack_transposed(v0, p.vsn, Nk, Dv, vt, nkp);
  acc_t *__restrict dka = w.dk.data(), *__restrict dva = w.dv.data();
  std::fill(w.dk.begin(), w.dk.end(), acc_t(0));
  std::fill(w.dv.begin(), w.dv.end(), acc_t(0));
  acc_t *__restrict qs = w.qs.data(), *__restrict dqb = w.dq.data();
  acc_t delta[kRows];
  for (int64_t c0 = 0; c0 < Nq; c0 += kBwdChunkRows) {
    const int64_t chunk_rows = round_up(std::min(kBwdChunkRows, Nq - c0), kRows);  // padding rows are zero
    for (int64_t i0 = c0; i0 < c0 + chunk_rows; i0 += kRows) {
      const int64_t rb = std::min(kRows, Nq - i0);
      acc_t *__restrict qp = w.qp.data() + (i0 - c0) * dp, *__restrict dob = w.dob.data() + (i0 - c0) * dvp;
      acc_t *__restrict s = w.s.data() + (i0 - c0) * nkp, *__restrict dpm = w.dpm.data() + (i0 - c0) * nkp;
      for (int64_t r = 0; r < kRows; ++r) {
        const bool live = r < rb;
        const scalar_t* qr = p.q + b * p.qsb + (i0 + r) * p.qsn + h * p.qsh;
        for (int64_t c = 0; c < D; ++c) {
          const acc_t x = live ? static_cast<acc_t>(qr[c]) : acc_t(0);
          qs[r * D + c] = x * p.scale;
          qp[r * dp + c] = x;
        }
        const int64_t row = ((b * Nq + i0 + r) * H + h) * Dv;
        acc_t d = 0;
        for (int64_t c = 0; c < Dv; ++c) {
          const acc_t g = live ? static_cast<acc_t>(dout[row + c]) : acc_t(0);
          dob[r * dvp + c] = g;
          d += live ? g * static_cast<acc_t>(out[row + c]) : acc_t(0);
        }
        delta[r] = d;  // D_i = dO_i . O_i
      }
      rows_times<acc_t, kD>(qs, D, D, kt, nkp, s);        // scores
      rows_times<acc_t, kDv>(dob, dvp, Dv, vt, nkp, dpm);  // dP = dO V^T
      for (int64_t r = 0; r < kRows; ++r) {
        acc_t* __restrict sr = s + r * nkp;
        acc_t* __restrict dr = dpm + r * nkp;
        if (r >= rb) {  // padding rows must add nothing to dK, dV
          std::fill(sr, sr + Nk, acc_t(0));
          std::fill(dr, dr + Nk, acc_t(0));
          continue;
        }
        const int64_t i = i0 + r;
        p.add_bias_and_max(sr, b, h, i);
        const acc_t row_lse = lse[(b * H + h) * Nq + i];
        const acc_t dl = delta[r];
#pragma omp simd
        for (int64_t j = 0; j < Nk; ++j) {
          const acc_t pj = exp_nonpositive(sr[j] - row_lse);
          sr[j] = pj;                  // P
          dr[j] = pj * (dr[j] - dl);   // dS
        }
        if (sink.table_part != nullptr) {
          const int32_t* ir = p.index + i * Nk;
          for (int64_t j = 0; j < Nk; ++j) sink.table_part[ir[j]] += dr[j];
        } else if (sink.shared_part != nullptr) {
          acc_t* __restrict part = sink.shared_part + i * Nk;
#pragma omp simd
          for (int64_t j = 0; j < Nk; ++j) part[j] += dr[j];
        } else if (sink.per_sample != nullptr) {
          std::copy(dr, dr + Nk, sink.per_sample + ((b * H + h) * Nq + i) * Nk);
        }
      }
      rows_times<acc_t, 0, kDp>(dpm, nkp, Nk, km, dp, dqb);  // dQ / scale = dS K
      for (int64_t r = 0; r < rb; ++r) {
        scalar_t* dqr = dq + ((b * Nq + i0 + r) * H + h) * D;
        for (int64_t c = 0; c < D; ++c) dqr[c] = static_cast<scalar_t>(dqb[r * dp + c] * p.scale);
      }
    }
    add_pt_times_x<acc_t, kDvp>(dva, dvp, Nk, w.s.data(), nkp, w.dob.data(), chunk_rows);  // dV += P^T dO
    add_pt_times_x<acc_t, kDp>(dka, dp, Nk, w.dpm.data(), nkp, w.qp.data(), chunk_rows);   // dK / scale += dS^T Q
  }
  for (int64_t j = 0; j < Nk; ++j) {
    scalar_t* dkr = dk + ((b * Nk + j) * H + h) * D;
    scalar_t* dvr = dv + ((b * Nk + j) * H + h) * Dv;
    for (int64_t c = 0; c < D; ++c) dkr[c] = static_cast<scalar_t>(dka[j * dp + c] * p.scale);
    for (int64_t c = 0; c < Dv; ++c) dvr[c] = static_cast<scalar_t>(dva[j * dvp + c]);
  }
}

// Pairs (or tasks) per parallel chunk: 1 when a pair is big, more for tiny pairs so that a small problem runs inline
// on the calling thread (waking the OpenMP team costs more than the work; at::parallel_for runs a range shorter than
// the grain without it). ~256K multiply-adds per chunk, like ATen's element grain of 32K for cheap element ops.
inline int64_t pair_grain(int64_t Nq, int64_t Nk, int64_t D, int64_t Dv, int64_t pairs_per_task = 1) {
  const int64_t work = std::max<int64_t>(1, Nq * Nk * (D + Dv) * pairs_per_task);
  return std::max<int64_t>(1, (int64_t(1) << 18) / work);
}

// Calls f(std::integral_constant<int64_t, D>, std::integral_constant<int64_t, Dv>) with compile-time head dims for
// the fp32 LeViT / ViT-ResNAS shapes, (0, 0) (runtime dims) otherwise: a few specialisations, not a combinatorial set.
template <typename scalar_t, typename F>
void with_head_dims(int64_t D, int64_t Dv, F&& f) {
  using I = int64_t;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (D == 16 && Dv == 32) return f(std::integral_constant<I, 16>{}, std::integral_constant<I, 32>{});
    if (D == 16 && Dv == 64) return f(std::integral_constant<I, 16>{}, std::integral_constant<I, 64>{});
    if (D == 32 && Dv == 64) return f(std::integral_constant<I, 32>{}, std::integral_constant<I, 64>{});
    if (D == 32 && Dv == 128) return f(std::integral_constant<I, 32>{}, std::integral_constant<I, 128>{});
    if (D == 32 && Dv == 32) return f(std::integral_constant<I, 32>{}, std::integral_constant<I, 32>{});
    if (D == 64 && Dv == 64) return f(std::integral_constant<I, 64>{}, std::integral_constant<I, 64>{});
  }
  f(std::integral_constant<I, 0>{}, std::integral_constant<I, 0>{});
}

// out[c] = sum over chunks k, in increasing k, of part[k][c]; the split of the columns over threads changes no bit.
template <typename acc_t>
void sum_partials(const acc_t* part, int64_t chunks, int64_t cols, acc_t* out) {
  at::parallel_for(0, cols, 4096, [&](int64_t c0, int64_t c1) {
    std::fill(out + c0, out + c1, acc_t(0));
    for (int64_t k = 0; k < chunks; ++k) {
      const acc_t* pk = part + k * cols;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) out[c] += pk[c];
    }
  });
}

// Zeroes heads [w_g, H) of every group along `head_dim` of t (dim 0 = samples; t freshly allocated, contiguous).
// Raw memsets, not narrow().zero_(): those views cost several dispatcher calls per group and tensor, which were
// most of a small supernet step's calls.
void zero_inactive_heads(at::Tensor& t, int64_t head_dim, int64_t per_head, const GroupTable& groups, int64_t H) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous() && t.size(head_dim) == H * per_head);
  int64_t outer = 1, inner = 1;  // elements between the samples dim and head_dim, and after head_dim
  for (int64_t d = 1; d < head_dim; ++d) outer *= t.size(d);
  for (int64_t d = head_dim + 1; d < t.dim(); ++d) inner *= t.size(d);
  const int64_t elem = static_cast<int64_t>(t.element_size());
  char* base = static_cast<char*>(t.data_ptr());
  for (int64_t g = 0; g < groups.num_groups(); ++g) {
    const int64_t w = groups.widths[g];
    if (groups.rows(g) == 0 || w >= H) continue;
    const int64_t skip = w * per_head * inner, count = (H - w) * per_head * inner, line = H * per_head * inner;
    for (int64_t row = groups.row_start[g] * outer; row < (groups.row_start[g] + groups.rows(g)) * outer; ++row)
      std::memset(base + (row * line + skip) * elem, 0, static_cast<size_t>(count * elem));
  }
}

// The heads metadata on the host: the CPU widths tensor's values, checked against [0, H] (make_group_table), and the
// active heads of every sample.
struct HeadTable {
  GroupTable groups;
  std::vector<int64_t> sample_heads;  // length B
};

HeadTable read_heads(const AttentionShape& shape, c10::IntArrayRef sizes, const at::Tensor& widths, const char* op) {
  HeadTable t{make_group_table(sizes, widths, shape.B, shape.H, op, "q (dim 2, H_max)", "widths"), {}};
  t.sample_heads.reserve(shape.B);
  for (int64_t g = 0; g < t.groups.num_groups(); ++g)
    t.sample_heads.insert(t.sample_heads.end(), t.groups.rows(g), t.groups.widths[g]);
  return t;
}

// (Nq, Nk) int32 index: the given one, checked against [0, T), or the LeViT grid's.
at::Tensor make_index(const AttentionShape& shape, const std::optional<at::Tensor>& index) {
  if (shape.grid_r > 0) {
    at::Tensor idx = at::empty({shape.Nq, shape.Nk}, at::TensorOptions().dtype(at::kInt));
    int32_t* d = idx.mutable_data_ptr<int32_t>();
    const int64_t R = shape.grid_r, S = shape.grid_s, Rq = (R - 1) / S + 1;
    for (int64_t i = 0; i < shape.Nq; ++i) {
      const int64_t qy = (i / Rq) * S, qx = (i % Rq) * S;
      int32_t* row = d + i * shape.Nk;
      for (int64_t ky = 0; ky < R; ++ky)  // key j = ky * R + kx, row-major
        for (int64_t kx = 0; kx < R; ++kx)
          row[ky * R + kx] = static_cast<int32_t>(std::abs(qy - ky) * R + std::abs(qx - kx));
    }
    return idx;
  }
  at::Tensor idx = index->to(at::kInt).contiguous();
  const int32_t* d = idx.const_data_ptr<int32_t>();
  for (int64_t n = 0; n < idx.numel(); ++n)
    TORCH_CHECK_VALUE(d[n] >= 0 && d[n] < shape.T, "bias_index values must lie in [0, T) = [0, ", shape.T,
                      ") (T = bias_table.shape[1]), got ", d[n], " at flat position ", n);
  // int64 values that wrapped in the int32 conversion would pass the range check: compare with the original.
  if (index->scalar_type() == at::kLong)
    TORCH_CHECK_VALUE(at::equal(idx.to(at::kLong), index->contiguous()), "bias_index values must lie in [0, T) = [0, ",
                shape.T, ")");
  return idx;
}

// The bias the kernels add to the scores, in the accumulation dtype: the dense bias, or the table gathered once per
// call into (H, Nq, Nk) when that is small (<= kMaxGatheredBias elements; gathering per (sample, head, row) instead
// costs an AVX-512 gather per 16 scores, which was 15% of the forward at LeViT shapes), else undefined (the kernels
// then gather table[h, index[i, j]] row by row).
constexpr int64_t kMaxGatheredBias = int64_t(1) << 22;

at::Tensor bias_planes(const AttentionShape& shape, const at::Tensor& table, const at::Tensor& index,
                       const std::optional<at::Tensor>& dense_bias, at::ScalarType acc) {
  if (shape.dense_lead != 0) return dense_bias->to(acc).contiguous();
  if (shape.T == 0 || shape.H * shape.Nq * shape.Nk > kMaxGatheredBias) return at::Tensor();
  // A plain loop, not index_select: that needs an int64 copy of the index and took ~100 us even at N = 16 (more than
  // the attention itself there).
  const int64_t H = shape.H, T = shape.T, NN = shape.Nq * shape.Nk;
  at::Tensor planes = at::empty({H, shape.Nq, shape.Nk}, table.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "bias_planes", [&] {
    const scalar_t* tab = table.const_data_ptr<scalar_t>();
    const int32_t* idx = index.const_data_ptr<int32_t>();  // checked against [0, T) by make_index
    scalar_t* dst = planes.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, H, std::max<int64_t>(1, (int64_t(1) << 16) / NN), [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h) {
        const scalar_t* th = tab + h * T;
        scalar_t* out = dst + h * NN;
        for (int64_t n = 0; n < NN; ++n) out[n] = th[idx[n]];
      }
    });
  });
  return planes;
}

template <typename scalar_t, typename acc_t>
void set_bias(Problem<scalar_t, acc_t>& p, const AttentionShape& shape, const at::Tensor& table,
              const at::Tensor& index, const at::Tensor& planes) {
  if (shape.T > 0) {
    p.table = table.const_data_ptr<acc_t>();
    p.T = shape.T;
    p.index = index.const_data_ptr<int32_t>();
  }
  if (planes.defined()) {
    p.dense = planes.const_data_ptr<acc_t>();
    p.dense_lead = shape.dense_lead != 0 ? shape.dense_lead : shape.H;
  }
}

template <typename scalar_t, typename acc_t>
Problem<scalar_t, acc_t> make_problem(const AttentionShape& shape, const HeadTable& heads, const at::Tensor& q,
                                      const at::Tensor& k, const at::Tensor& v, double scale) {
  Problem<scalar_t, acc_t> p;
  p.B = shape.B; p.Nq = shape.Nq; p.Nk = shape.Nk; p.H = shape.H; p.Dqk = shape.Dqk; p.Dv = shape.Dv;
  p.q = q.const_data_ptr<scalar_t>(); p.k = k.const_data_ptr<scalar_t>(); p.v = v.const_data_ptr<scalar_t>();
  p.qsb = q.stride(0); p.qsn = q.stride(1); p.qsh = q.stride(2);
  p.ksb = k.stride(0); p.ksn = k.stride(1); p.ksh = k.stride(2);
  p.vsb = v.stride(0); p.vsn = v.stride(1); p.vsh = v.stride(2);
  p.scale = static_cast<acc_t>(scale);
  p.heads = heads.sample_heads.data();
  return p;
}

}  // namespace

AttentionFwdOut ragged_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const std::optional<at::Tensor>& bias_table,
                                         const std::optional<at::Tensor>& bias_index,
                                         const std::optional<at::Tensor>& dense_bias, c10::IntArrayRef sizes,
                                         const at::Tensor& widths, double scale, c10::IntArrayRef grid) {
  const AttentionShape shape = attention_detail::check_args(q, k, v, bias_table, bias_index, dense_bias, sizes,
                                                            widths, scale, grid, at::kCPU, kFwdName);
  const HeadTable heads = read_heads(shape, sizes, widths, kFwdName);
  const auto acc = attention_detail::acc_dtype(q.scalar_type());
  at::Tensor out = at::empty({shape.B, shape.Nq, shape.H * shape.Dv}, q.options());
  at::Tensor lse = at::empty({shape.B, shape.H, shape.Nq}, q.options().dtype(acc));
  zero_inactive_heads(out, 2, shape.Dv, heads.groups, shape.H);
  zero_inactive_heads(lse, 1, 1, heads.groups, shape.H);
  const bool has_table = shape.T > 0;
  const at::Tensor table = has_table ? bias_table->to(acc).contiguous() : at::Tensor();
  const at::Tensor index = has_table ? make_index(shape, bias_index) : at::Tensor();
  const at::Tensor planes = bias_planes(shape, table, index, dense_bias, acc);
  std::vector<std::pair<int64_t, int64_t>> pairs;  // active (sample, head) pairs: the only work there is
  for (int64_t b = 0; b < shape.B; ++b)
    for (int64_t h = 0; h < heads.sample_heads[b]; ++h) pairs.emplace_back(b, h);
  if (pairs.empty()) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), kFwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto p = make_problem<scalar_t, acc_t>(shape, heads, q, k, v, scale);
    set_bias(p, shape, table, index, planes);
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    acc_t* lse_ptr = lse.mutable_data_ptr<acc_t>();
    with_head_dims<scalar_t>(shape.Dqk, shape.Dv, [&](auto kD, auto kDv) {
      const int64_t grain = pair_grain(shape.Nq, shape.Nk, shape.Dqk, shape.Dv);
      at::parallel_for(0, static_cast<int64_t>(pairs.size()), grain, [&](int64_t begin, int64_t end) {
        FwdScratch<acc_t> scratch(shape.Nk, shape.Dqk, shape.Dv);
        for (int64_t n = begin; n < end; ++n)
          fwd_pair<scalar_t, acc_t, decltype(kD)::value, decltype(kDv)::value>(p, pairs[n].first, pairs[n].second,
                                                                              scratch, out_ptr, lse_ptr);
      });
    });
  });
  return {out, lse};
}

AttentionBwdOut ragged_attention_bwd_cpu(const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& out_in, const at::Tensor& lse_in,
                                         const std::optional<at::Tensor>& bias_table,
                                         const std::optional<at::Tensor>& bias_index,
                                         const std::optional<at::Tensor>& dense_bias, c10::IntArrayRef sizes,
                                         const at::Tensor& widths, double scale, c10::IntArrayRef grid,
                                         bool need_table_grad, bool need_dense_grad, int64_t chunk) {
  const AttentionShape shape = attention_detail::check_args(q, k, v, bias_table, bias_index, dense_bias, sizes,
                                                            widths, scale, grid, at::kCPU, kBwdName);
  attention_detail::check_bwd_args(shape, q, dout_in, out_in, lse_in);
  TORCH_CHECK_VALUE(chunk >= 1, kBwdName, ": chunk must be >= 1, got ", chunk);
  const HeadTable heads = read_heads(shape, sizes, widths, kBwdName);
  const auto acc = attention_detail::acc_dtype(q.scalar_type());
  const int64_t B = shape.B, H = shape.H, Nq = shape.Nq, Nk = shape.Nk;
  const bool table_grad = need_table_grad && shape.T > 0;
  const bool dense_grad = need_dense_grad && shape.dense_lead != 0;
  const at::Tensor dout = dout_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor dq = at::empty({B, Nq, H, shape.Dqk}, q.options());
  at::Tensor dk = at::empty({B, Nk, H, shape.Dqk}, q.options());
  at::Tensor dv = at::empty({B, Nk, H, shape.Dv}, q.options());
  zero_inactive_heads(dq, 2, 1, heads.groups, H);
  zero_inactive_heads(dk, 2, 1, heads.groups, H);
  zero_inactive_heads(dv, 2, 1, heads.groups, H);
  const bool has_table = shape.T > 0;
  const at::Tensor table = has_table ? bias_table->to(acc).contiguous() : at::Tensor();
  const at::Tensor index = has_table ? make_index(shape, bias_index) : at::Tensor();
  const at::Tensor planes = bias_planes(shape, table, index, dense_bias, acc);

  const bool per_sample_dense = dense_grad && shape.dense_lead == -1;
  const bool shared_dense = dense_grad && shape.dense_lead != -1;
  const int64_t part_cols = table_grad ? shape.T : (shared_dense ? Nq * Nk : 0);
  // Table gradient: each task first sums dS over its samples into an (Nq, Nk) buffer (vectorised adds) and scatters
  // that into its table partial once, instead of one scalar scatter per sample (the scatter was ~20% of the LeViT
  // backward). Skipped when an (Nq, Nk) buffer per thread would be large.
  const bool sum_then_scatter = table_grad && Nq * Nk <= (int64_t(1) << 20);
  if (part_cols == 0) chunk = 1;  // no partials: one task per (sample, head), the most parallelism
  const int64_t chunks = B == 0 ? 0 : (B + chunk - 1) / chunk;
  at::Tensor part = part_cols > 0 ? at::zeros({chunks, H, part_cols}, q.options().dtype(acc)) : at::Tensor();
  at::Tensor ddense_acc = per_sample_dense ? at::zeros({B, H, Nq, Nk}, q.options().dtype(acc)) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), kBwdName, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto p = make_problem<scalar_t, acc_t>(shape, heads, q, k, v, scale);
    set_bias(p, shape, table, index, planes);
    const scalar_t* dout_ptr = dout.const_data_ptr<scalar_t>();
    const scalar_t* out_ptr = out.const_data_ptr<scalar_t>();
    const acc_t* lse_ptr = lse.const_data_ptr<acc_t>();
    scalar_t *dq_ptr = dq.mutable_data_ptr<scalar_t>(), *dk_ptr = dk.mutable_data_ptr<scalar_t>(),
             *dv_ptr = dv.mutable_data_ptr<scalar_t>();
    acc_t* part_ptr = part_cols > 0 ? part.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* ddense_ptr = per_sample_dense ? ddense_acc.mutable_data_ptr<acc_t>() : nullptr;
    // Tasks (chunk c, head h): samples [c*chunk, (c+1)*chunk) in order, each with head h if it is active.
    with_head_dims<scalar_t>(shape.Dqk, shape.Dv, [&](auto kD, auto kDv) {
      const int64_t grain = pair_grain(Nq, Nk, shape.Dqk, shape.Dv, 3 * chunk);  // bwd: ~3x the fwd work per pair
      at::parallel_for(0, chunks * H, grain, [&](int64_t begin, int64_t end) {
        std::optional<BwdScratch<acc_t>> scratch;  // built on the first active pair of this thread
        std::vector<acc_t> dsum;                    // the task's sum of dS over its samples (table gradient)
        for (int64_t task = begin; task < end; ++task) {
          const int64_t c = task / H, h = task % H;
          BiasGradSink<acc_t> sink;
          acc_t* mine = part_ptr != nullptr ? part_ptr + (c * H + h) * part_cols : nullptr;
          if (table_grad && sum_then_scatter) {
            dsum.assign(Nq * Nk, acc_t(0));
            sink.shared_part = dsum.data();
          } else if (table_grad) {
            sink.table_part = mine;
          } else {
            sink.shared_part = mine;
          }
          sink.per_sample = ddense_ptr;
          bool any = false;
          for (int64_t b = c * chunk; b < std::min(B, (c + 1) * chunk); ++b) {
            if (h >= heads.sample_heads[b]) continue;
            if (!scratch) scratch.emplace(Nk, shape.Dqk, shape.Dv);
            bwd_pair<scalar_t, acc_t, decltype(kD)::value, decltype(kDv)::value>(
                p, b, h, *scratch, dout_ptr, out_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr, sink);
            any = true;
          }
          if (table_grad && sum_then_scatter && any) {  // one scalar scatter per task, not per sample
            const int32_t* idx = p.index;
            for (int64_t n = 0; n < Nq * Nk; ++n) mine[idx[n]] += dsum[n];
          }
        }
      });
    });
  });

  at::Tensor dtable = at::empty({0}, q.options());
  at::Tensor ddense = at::empty({0}, q.options());
  if (part_cols > 0) {
    at::Tensor summed = at::empty({H, part_cols}, q.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, kBwdName, [&] {
      sum_partials<scalar_t>(part.const_data_ptr<scalar_t>(), chunks, H * part_cols,
                             summed.mutable_data_ptr<scalar_t>());
    });
    if (table_grad) {
      dtable = summed.to(bias_table->scalar_type());
    } else {
      at::Tensor planes = summed.view({H, Nq, Nk});
      if (shape.dense_lead == 1) {  // shared over heads: add the heads in increasing order
        at::Tensor one = planes.select(0, 0).clone();
        for (int64_t h = 1; h < H; ++h) one.add_(planes.select(0, h));
        planes = one.unsqueeze(0);
      }
      ddense = planes.to(dense_bias->scalar_type());
    }
  } else if (per_sample_dense) {
    ddense = ddense_acc.to(dense_bias->scalar_type());
  }
  return {dq, dk, dv, dtable, ddense};
}

// ---------------------------------------------------------------------------------------------------------------------
// resnas::ragged_attention: the public op of the C++ backend, one dispatcher hop from Python. Its Autograd kernel runs
// the ext_* kernels through the dispatcher (so torch.compile's tracing sees them and uses their Python fake kernels);
// the argument checks run once, in the forward kernel (check_args), and again only if a backward runs.
// ---------------------------------------------------------------------------------------------------------------------
namespace {

using FwdSignature = AttentionFwdOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                     const std::optional<at::Tensor>&, c10::IntArrayRef, const at::Tensor&, double,
                                     c10::IntArrayRef);
using BwdSignature = AttentionBwdOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                     c10::IntArrayRef, const at::Tensor&, double, c10::IntArrayRef, bool, bool, int64_t);

AttentionFwdOut call_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& index,
                         const std::optional<at::Tensor>& dense, c10::IntArrayRef sizes, const at::Tensor& widths,
                         double scale, c10::IntArrayRef grid) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("resnas::ext_ragged_attention_fwd", "")
                             .typed<FwdSignature>();
  return op.call(q, k, v, table, index, dense, sizes, widths, scale, grid);
}

// Samples per bias-gradient task: `_bias_chunk` in resnas_kernels/ops/ragged_attention.py (a function of the batch
// size only, so the bias gradient's bits depend on the shape only).
int64_t bias_chunk(int64_t batch, bool per_sample_dense) {
  return per_sample_dense ? 1 : std::max<int64_t>(1, std::min<int64_t>(8, batch));
}

class RaggedAttentionFunction : public torch::autograd::Function<RaggedAttentionFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& table,
                                                const std::optional<at::Tensor>& index,
                                                const std::optional<at::Tensor>& dense, c10::IntArrayRef sizes,
                                                const at::Tensor& widths, double scale, c10::IntArrayRef grid) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = call_fwd(q, k, v, table, index, dense, sizes, widths, scale, grid);
    const at::Tensor none;
    ctx->save_for_backward({q, k, v, out, lse, table.value_or(none), index.value_or(none), dense.value_or(none),
                            widths});
    ctx->saved_data["sizes"] = sizes.vec();
    ctx->saved_data["grid"] = grid.vec();
    ctx->saved_data["scale"] = scale;
    // Edge indices of bias_table and dense_bias among the tensor inputs (undefined optionals have no edge).
    const bool has_table = table.has_value() && table->defined(), has_index = index.has_value() && index->defined();
    ctx->saved_data["table_edge"] = static_cast<int64_t>(has_table ? 3 : -1);
    ctx->saved_data["dense_edge"] = static_cast<int64_t>(3 + has_table + has_index);
    return {out};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("resnas::ext_ragged_attention_bwd", "")
                               .typed<BwdSignature>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const at::Tensor &table = saved[5], &index = saved[6], &dense = saved[7], &widths = saved[8];
    const int64_t table_edge = ctx->saved_data["table_edge"].toInt();
    const bool need_table = table.defined() && ctx->needs_input_grad(table_edge);
    const bool need_dense = dense.defined() && ctx->needs_input_grad(ctx->saved_data["dense_edge"].toInt());
    const auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
    const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector();
    const std::vector<int64_t> grid = ctx->saved_data["grid"].toIntVector();
    auto [dq, dk, dv, dtable, ddense] =
        op.call(grads[0], q, k, v, out, lse, opt(table), opt(index), opt(dense), sizes, widths,
                ctx->saved_data["scale"].toDouble(), grid, need_table, need_dense,
                bias_chunk(q.size(0), dense.defined() && dense.dim() == 4));
    const at::Tensor none;
    return {dq, dk, dv, need_table ? dtable : none, none, need_dense ? ddense : none, none, none, none, none};
  }
};

bool any_requires_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& dense) {
  const auto opt = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  return q.requires_grad() || k.requires_grad() || v.requires_grad() || opt(table) || opt(dense);
}

// Autograd key: a graph node only when some input needs a gradient; otherwise straight to the forward kernel.
at::Tensor ragged_attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& index,
                                     const std::optional<at::Tensor>& dense, c10::IntArrayRef sizes,
                                     const at::Tensor& widths, double scale, c10::IntArrayRef grid) {
  if (at::GradMode::is_enabled() && any_requires_grad(q, k, v, table, dense))
    return RaggedAttentionFunction::apply(q, k, v, table, index, dense, sizes, widths, scale, grid)[0];
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return std::get<0>(call_fwd(q, k, v, table, index, dense, sizes, widths, scale, grid));
}

// Below autograd (inference tensors, or called below the Autograd key): the forward only.
at::Tensor ragged_attention_forward_only(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const std::optional<at::Tensor>& table,
                                         const std::optional<at::Tensor>& index,
                                         const std::optional<at::Tensor>& dense, c10::IntArrayRef sizes,
                                         const at::Tensor& widths, double scale, c10::IntArrayRef grid) {
  return std::get<0>(call_fwd(q, k, v, table, index, dense, sizes, widths, scale, grid));
}

}  // namespace
}  // namespace resnas

TORCH_LIBRARY_IMPL(resnas, CPU, m) {
  m.impl("ext_ragged_attention_fwd", &resnas::ragged_attention_fwd_cpu);
  m.impl("ext_ragged_attention_bwd", &resnas::ragged_attention_bwd_cpu);
}

TORCH_LIBRARY_IMPL(resnas, Autograd, m) { m.impl("ragged_attention", &resnas::ragged_attention_autograd); }

TORCH_LIBRARY_IMPL(resnas, CompositeExplicitAutograd, m) {
  m.impl("ragged_attention", &resnas::ragged_attention_forward_only);
}
