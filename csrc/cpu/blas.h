// GEMM on raw pointers for the CPU kernels (ragged_linear.cpp, rsr_conv.cpp): one BLAS call per GEMM, no tensors,
// so no dispatcher calls. A supernet step makes thousands of small GEMMs; as ATen views (narrow / slice / as_strided
// + mm per group and block) they cost more host time than the products at the supernet's small shapes.
//
// fp32 / fp64 call the BLAS that PyTorch links (sgemm_ / dgemm_), fp16 / bf16 its half-input, fp32-output GEMMs; a
// PyTorch build without those symbols falls back to ATen's matmul on wrapped blocks (`aten_gemm`). Called from
// inside an OpenMP region the BLAS runs single-threaded; from outside, with PyTorch's thread count.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

// The BLAS that PyTorch links (MKL on x86 wheels) exports these; weak, so that a build of PyTorch without them still
// loads this library and takes ATen's matmul instead (`aten_gemm`).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's half-input GEMMs with fp32 output (CBLAS layout / transpose enums passed as their int values).
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                            int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                          int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
// MKL's per-thread thread count, C interface (returns the previous one; 0: the global setting). The lowercase
// `mkl_set_num_threads_local` is the Fortran interface and takes a pointer.
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace resnas {
namespace cpu_blas {

// While alive, this thread's BLAS calls run on this thread alone. For GEMMs inside a parallel region whose threads
// own different tiles: PyTorch turns MKL's dynamic threading off, so MKL would otherwise start its own threads inside
// each task (seen: a 15 x 720 x 400 SGEMM on 2 threads inside a 2-thread region), and a tile's result would depend on
// the thread count (MKL splits the work differently). No effect with a BLAS other than MKL (OpenBLAS built with
// OpenMP runs single-threaded inside a parallel region by itself).
class SequentialBlas {
 public:
  SequentialBlas() : active_(MKL_Set_Num_Threads_Local != nullptr) {
    if (active_) previous_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (active_) MKL_Set_Num_Threads_Local(previous_);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  bool active_;
  int previous_ = 0;
};

// ---------------------------------------------------------------------------------------------------------------------
// GEMM on raw pointers: C (m x n) = op(A) op(B) + beta C, every matrix row-major with its leading dimension
// (op(A) = A^T when trans_a). fp32 / fp64: C has the inputs' type; fp16 / bf16: C is fp32.
// ---------------------------------------------------------------------------------------------------------------------
// Below C++20's std::make_unique_for_overwrite: uninitialised scratch memory from ATen's CPU allocator.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) : ptr_(c10::GetCPUAllocator()->allocate(std::max<int64_t>(n, 1) * sizeof(T))) {}
  T* get() const { return static_cast<T*>(ptr_.get()); }

 private:
  c10::DataPtr ptr_;
};

inline int blas_int(int64_t v) {
  TORCH_CHECK(v <= INT_MAX, "a GEMM dimension of ", v, " does not fit the BLAS's 32-bit integers");
  return static_cast<int>(v);
}

// The fallback when the BLAS symbols are absent: ATen's matmul on tensors wrapping the blocks (no operand copies
// for fp32 / fp64). Costs a few dispatcher calls per GEMM, which the BLAS path avoids.
template <typename in_t, typename out_t>
inline void aten_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const in_t* a, int64_t lda,
               const in_t* b, int64_t ldb, out_t beta, out_t* c, int64_t ldc) {
  const auto in_opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<in_t>::value);
  const auto out_type = c10::CppTypeToScalarType<out_t>::value;
  at::Tensor A = at::from_blob(const_cast<in_t*>(a), {trans_a ? k : m, trans_a ? m : k}, {lda, 1}, in_opts);
  at::Tensor B = at::from_blob(const_cast<in_t*>(b), {trans_b ? n : k, trans_b ? k : n}, {ldb, 1}, in_opts);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, at::TensorOptions().dtype(out_type));
  const at::Tensor product = at::mm((trans_a ? A.t() : A).to(out_type), (trans_b ? B.t() : B).to(out_type));
  if (beta == out_t(0)) {
    C.copy_(product);
  } else {
    C.mul_(beta).add_(product);
  }
}

template <typename in_t, typename out_t>
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const in_t* a, int64_t lda, const in_t* b,
          int64_t ldb, out_t beta, out_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty product: C = beta C
    for (int64_t i = 0; i < m; ++i) {
      out_t* row = c + i * ldc;
      for (int64_t j = 0; j < n; ++j) row[j] = beta == out_t(0) ? out_t(0) : beta * row[j];
    }
    return;
  }
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the same call with the operands swapped.
  const int M = blas_int(n), N = blas_int(m), K = blas_int(k), LDA = blas_int(ldb), LDB = blas_int(lda),
            LDC = blas_int(ldc);
  const char TA = trans_b ? 'T' : 'N', TB = trans_a ? 'T' : 'N';
  if constexpr (std::is_same_v<in_t, float> && std::is_same_v<out_t, float>) {
    if (sgemm_ != nullptr) {
      const float one = 1.0f;
      sgemm_(&TA, &TB, &M, &N, &K, &one, b, &LDA, a, &LDB, &beta, c, &LDC);
      return;
    }
  } else if constexpr (std::is_same_v<in_t, double>) {
    if (dgemm_ != nullptr) {
      const double one = 1.0;
      dgemm_(&TA, &TB, &M, &N, &K, &one, b, &LDA, a, &LDB, &beta, c, &LDC);
      return;
    }
  } else {
    constexpr int kColMajor = 102, kNoTrans = 111, kTrans = 112;
    const auto half_gemm = std::is_same_v<in_t, at::BFloat16> ? cblas_gemm_bf16bf16f32 : cblas_gemm_f16f16f32;
    if (half_gemm != nullptr) {
      half_gemm(kColMajor, trans_b ? kTrans : kNoTrans, trans_a ? kTrans : kNoTrans, M, N, K, 1.0f,
                reinterpret_cast<const uint16_t*>(b), LDA, reinterpret_cast<const uint16_t*>(a), LDB, beta, c, LDC);
      return;
    }
  }
  aten_gemm<in_t, out_t>(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace cpu_blas
}  // namespace resnas
