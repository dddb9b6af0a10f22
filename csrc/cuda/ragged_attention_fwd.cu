// Ragged multi-head attention, CUDA C++ forward for inference: resnas::ext_ragged_attention_fwd on CUDA tensors
// (schema and semantics in ../ragged_attention.h; the backward on CUDA runs the Triton kernels, see
// resnas_kernels/ops/ragged_attention.py).
//
// Design (small N, written to be obviously correct rather than clever):
// - Block (query-row slab of kRowsPerBlock rows, head h, sample b), kWarps warps. The heads of sample b are read on
//   the device: widths[g] of its group g (found in the static group starts passed by value), clamped to [0, H], so
//   the launch never reads the metadata on the host (no sync; a CUDA graph replays with new widths). An inactive
//   (b, h) block only writes zeros. An active block stages K_h and V_h of its sample in shared memory as fp32 (K rows padded by one float so
//   the lanes' column reads hit distinct banks), then each warp takes one query row at a time:
//     lane l scores keys j = l, l + 32, ... (<= kMaxKeysPerLane per lane, so Nk <= 256), adds the bias, and the warp
//     reduces max and sum with shuffles; the probabilities go to the warp's shared row, and lane l accumulates output
//     channels c = l, l + 32, ... over all keys. Scores, softmax and sums are fp32; expf / logf (not the fast
//     intrinsics) so results match the fp32 reference to rounding.
// - Bias: the table (as fp32) with the index read from an int32 (Nq, Nk) tensor, or with the LeViT grid computed
//   in-kernel; or a dense (1|H|B*H, Nq, Nk) bias (as fp32). Out-of-range table columns read as 0 (the Python op checks
//   the index first; this only guarantees no out-of-bounds read).
// - Limits: Nk <= 256, d_qk <= 128, d_v <= 128, shared memory <= kMaxSmemBytes, at most kMaxGroups groups; the
//   Python op sends other shapes to the Triton kernels. fp64 is not supported here (the Python op uses the reference for fp64).
// - Not benchmarked or run by its author (no GPU was available); it is compiled for sm_80 / sm_90 with the package.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cusparse / cublas headers a minimal toolkit lacks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "../ragged_attention.h"

namespace resnas {
namespace {

constexpr const char* kName = "ext_ragged_attention_fwd (cuda)";
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerBlock = 64;
constexpr int kMaxKeysPerLane = 8;         // Nk <= 8 * 32 = 256
constexpr int kMaxOutPerLane = 4;          // d_v <= 4 * 32 = 128
constexpr int64_t kMaxSmemBytes = 96 * 1024;  // within every sm_80+ opt-in limit
// Group starts travel in the kernel's parameters (1 KB of its 4 KB), read in place (__grid_constant__: no per-thread
// copy of the struct), so a launch needs no host-to-device copy of metadata.
constexpr int kMaxGroups = 256;

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  const int32_t* widths;  // (G,) active heads per group, device metadata (clamped to [0, H] where read)
  const float* table;    // (H, T) or null
  const int32_t* index;  // (Nq, Nk) or null (grid or no table)
  const float* dense;    // (1|H|B*H, Nq, Nk) or null
  int64_t qsb, qsn, qsh, ksb, ksn, ksh, vsb, vsn, vsh;
  int B, Nq, Nk, H, Dqk, Dv, T;
  int grid_r, grid_s, grid_rq;  // grid_r > 0: LeViT grid index
  int dense_lead;               // 0 none, 1 shared, H per head, -1 per sample
  float scale;
  int num_groups;
  int group_start[kMaxGroups + 1];  // samples of group g: [group_start[g], group_start[g + 1]); static
};

// Active heads of sample b: its group's width, clamped to [0, H] whatever the tensor holds.
__device__ __forceinline__ int active_heads(const FwdParams& p, int b) {
  int g = 0;
  while (g + 1 < p.num_groups && b >= p.group_start[g + 1]) ++g;
  return min(max(p.widths[g], 0), p.H);
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float bias_at(const FwdParams& p, int b, int h, int i, int j) {
  if (p.table != nullptr) {
    int t;
    if (p.grid_r > 0) {
      const int qy = (i / p.grid_rq) * p.grid_s, qx = (i % p.grid_rq) * p.grid_s;
      t = abs(qy - j / p.grid_r) * p.grid_r + abs(qx - j % p.grid_r);
    } else {
      t = p.index[static_cast<int64_t>(i) * p.Nk + j];
    }
    return (t >= 0 && t < p.T) ? p.table[static_cast<int64_t>(h) * p.T + t] : 0.0f;
  }
  if (p.dense != nullptr) {
    const int64_t plane = p.dense_lead == 1 ? 0 : (p.dense_lead == -1 ? static_cast<int64_t>(b) * p.H + h : h);
    return p.dense[(plane * p.Nq + i) * p.Nk + j];
  }
  return 0.0f;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) attn_fwd_warp_per_row_kernel(const __grid_constant__ FwdParams p) {
  extern __shared__ float smem[];
  const int b = blockIdx.z, h = blockIdx.y;
  const int row0 = blockIdx.x * kRowsPerBlock;
  const int row_end = min(p.Nq, row0 + kRowsPerBlock);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  scalar_t* out = static_cast<scalar_t*>(p.out);
  const int64_t out_row = static_cast<int64_t>(p.H) * p.Dv;  // out is (B, Nq, H * Dv), contiguous

  if (h >= active_heads(p, b)) {  // inactive head: zeros only, nothing read
    for (int e = threadIdx.x; e < (row_end - row0) * p.Dv; e += kThreads) {
      const int i = row0 + e / p.Dv, c = e % p.Dv;
      out[(static_cast<int64_t>(b) * p.Nq + i) * out_row + h * p.Dv + c] = scalar_t(0.0f);
    }
    for (int i = row0 + threadIdx.x; i < row_end; i += kThreads)
      p.lse[(static_cast<int64_t>(b) * p.H + h) * p.Nq + i] = 0.0f;
    return;
  }

  const int ks_stride = p.Dqk + 1;  // +1: lanes reading column c of different key rows hit different banks
  float* ks = smem;                                   // Nk x (Dqk + 1)
  float* vs = ks + p.Nk * ks_stride;                  // Nk x Dv
  float* qs = vs + p.Nk * p.Dv;                       // kWarps x Dqk
  float* ps = qs + kWarps * p.Dqk;                    // kWarps x Nk
  const scalar_t* k = static_cast<const scalar_t*>(p.k) + b * p.ksb + h * p.ksh;
  const scalar_t* v = static_cast<const scalar_t*>(p.v) + b * p.vsb + h * p.vsh;
  for (int e = threadIdx.x; e < p.Nk * p.Dqk; e += kThreads) {
    const int j = e / p.Dqk, c = e % p.Dqk;
    ks[j * ks_stride + c] = static_cast<float>(k[j * p.ksn + c]);
  }
  for (int e = threadIdx.x; e < p.Nk * p.Dv; e += kThreads) {
    const int j = e / p.Dv, c = e % p.Dv;
    vs[j * p.Dv + c] = static_cast<float>(v[j * p.vsn + c]);
  }
  __syncthreads();

  float* qw = qs + warp * p.Dqk;
  float* pw = ps + warp * p.Nk;
  const scalar_t* q = static_cast<const scalar_t*>(p.q) + b * p.qsb + h * p.qsh;
  for (int i = row0 + warp; i < row_end; i += kWarps) {
    for (int c = lane; c < p.Dqk; c += 32) qw[c] = static_cast<float>(q[i * p.qsn + c]) * p.scale;
    __syncwarp();
    float s[kMaxKeysPerLane];
    float m = -INFINITY;
#pragma unroll
    for (int t = 0; t < kMaxKeysPerLane; ++t) {
      const int j = lane + 32 * t;
      s[t] = -INFINITY;
      if (j < p.Nk) {
        float acc = 0.0f;
        for (int c = 0; c < p.Dqk; ++c) acc = fmaf(qw[c], ks[j * ks_stride + c], acc);
        s[t] = acc + bias_at(p, b, h, i, j);
        m = fmaxf(m, s[t]);
      }
    }
    m = warp_max(m);
    float l = 0.0f;
#pragma unroll
    for (int t = 0; t < kMaxKeysPerLane; ++t) {
      const int j = lane + 32 * t;
      if (j < p.Nk) {
        const float e = expf(s[t] - m);
        pw[j] = e;
        l += e;
      }
    }
    l = warp_sum(l);
    __syncwarp();  // every lane's probabilities are in pw
    const float inv_l = 1.0f / l;
    scalar_t* orow = out + (static_cast<int64_t>(b) * p.Nq + i) * out_row + h * p.Dv;
#pragma unroll
    for (int t = 0; t < kMaxOutPerLane; ++t) {
      const int c = lane + 32 * t;
      if (c < p.Dv) {
        float acc = 0.0f;
        for (int j = 0; j < p.Nk; ++j) acc = fmaf(pw[j], vs[j * p.Dv + c], acc);
        orow[c] = static_cast<scalar_t>(acc * inv_l);
      }
    }
    if (lane == 0) p.lse[(static_cast<int64_t>(b) * p.H + h) * p.Nq + i] = m + logf(l);
    __syncwarp();  // qw / pw are rewritten for the warp's next row
  }
}

int64_t smem_bytes(int64_t Nk, int64_t Dqk, int64_t Dv) {
  return (Nk * (Dqk + 1) + Nk * Dv + kWarps * (Dqk + Nk)) * static_cast<int64_t>(sizeof(float));
}

}  // namespace

AttentionFwdOut ragged_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& bias_table,
                                          const std::optional<at::Tensor>& bias_index,
                                          const std::optional<at::Tensor>& dense_bias, c10::IntArrayRef sizes,
                                          const at::Tensor& widths, double scale, c10::IntArrayRef grid) {
  const AttentionShape shape = attention_detail::check_args(q, k, v, bias_table, bias_index, dense_bias, sizes,
                                                            widths, scale, grid, at::kCUDA, kName);
  TORCH_CHECK(q.scalar_type() != at::kDouble, kName, ": fp64 is not supported (the Python op uses the reference)");
  TORCH_CHECK(shape.Nk <= 32 * kMaxKeysPerLane && shape.Dqk <= 128 && shape.Dv <= 32 * kMaxOutPerLane, kName,
              ": the warp-per-row kernel needs Nk <= 256, d_qk <= 128, d_v <= 128; got Nk = ", shape.Nk, ", d_qk = ",
              shape.Dqk, ", d_v = ", shape.Dv);
  const int64_t smem = smem_bytes(shape.Nk, shape.Dqk, shape.Dv);
  TORCH_CHECK(smem <= kMaxSmemBytes, kName, ": needs ", smem, " bytes of shared memory, more than ", kMaxSmemBytes);
  TORCH_CHECK(shape.B <= 65535 && shape.H <= 65535, kName, ": B and H must be <= 65535 (grid limits)");
  TORCH_CHECK(static_cast<int64_t>(sizes.size()) <= kMaxGroups, kName, ": at most ", kMaxGroups,
              " groups, got ", sizes.size());
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({shape.B, shape.Nq, shape.H * shape.Dv}, q.options());
  at::Tensor lse = at::empty({shape.B, shape.H, shape.Nq}, q.options().dtype(at::kFloat));
  if (shape.B == 0) return {out, lse};
  const at::Tensor widths_c = widths.contiguous();
  const bool has_table = shape.T > 0;
  at::Tensor table = has_table ? bias_table->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor index = (has_table && shape.grid_r == 0) ? bias_index->to(at::kInt).contiguous() : at::Tensor();
  at::Tensor dense = shape.dense_lead != 0 ? dense_bias->to(at::kFloat).contiguous() : at::Tensor();

  FwdParams p{};
  p.q = q.const_data_ptr(); p.k = k.const_data_ptr(); p.v = v.const_data_ptr();
  p.out = out.mutable_data_ptr(); p.lse = lse.mutable_data_ptr<float>();
  p.widths = widths_c.const_data_ptr<int32_t>();
  p.num_groups = static_cast<int>(sizes.size());
  p.group_start[0] = 0;
  for (size_t g = 0; g < sizes.size(); ++g) p.group_start[g + 1] = p.group_start[g] + static_cast<int>(sizes[g]);
  p.table = has_table ? table.const_data_ptr<float>() : nullptr;
  p.index = index.defined() ? index.const_data_ptr<int32_t>() : nullptr;
  p.dense = dense.defined() ? dense.const_data_ptr<float>() : nullptr;
  p.qsb = q.stride(0); p.qsn = q.stride(1); p.qsh = q.stride(2);
  p.ksb = k.stride(0); p.ksn = k.stride(1); p.ksh = k.stride(2);
  p.vsb = v.stride(0); p.vsn = v.stride(1); p.vsh = v.stride(2);
  p.B = static_cast<int>(shape.B); p.Nq = static_cast<int>(shape.Nq); p.Nk = static_cast<int>(shape.Nk);
  p.H = static_cast<int>(shape.H); p.Dqk = static_cast<int>(shape.Dqk); p.Dv = static_cast<int>(shape.Dv);
  p.T = static_cast<int>(shape.T);
  p.grid_r = static_cast<int>(shape.grid_r); p.grid_s = static_cast<int>(shape.grid_s);
  p.grid_rq = shape.grid_r > 0 ? static_cast<int>((shape.grid_r - 1) / shape.grid_s + 1) : 0;
  p.dense_lead = static_cast<int>(shape.dense_lead);
  p.scale = static_cast<float>(scale);

  const dim3 grid_dims(static_cast<unsigned>((shape.Nq + kRowsPerBlock - 1) / kRowsPerBlock),
                       static_cast<unsigned>(shape.H), static_cast<unsigned>(shape.B));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), kName, [&] {
    auto kernel = attn_fwd_warp_per_row_kernel<scalar_t>;
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    kernel<<<grid_dims, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

}  // namespace resnas

TORCH_LIBRARY_IMPL(resnas, CUDA, m) { m.impl("ext_ragged_attention_fwd", &resnas::ragged_attention_fwd_cuda); }
