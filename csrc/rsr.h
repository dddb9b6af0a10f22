// Residual spatial reduction (RSR) pieces on the token layout: shared declarations, geometry and argument checks of the
// CPU (csrc/cpu/rsr_im2col.cpp, csrc/cpu/rsr_conv.cpp, csrc/cpu/rsr_epilogue.cpp) and CUDA (csrc/cuda/rsr_im2col.cu,
// csrc/cuda/rsr_epilogue.cu) kernels. Python side and exact semantics: resnas_kernels/ops/rsr_im2col/, rsr_conv/ and
// rsr_epilogue/ (`reference_backend.py`).
//
// Schemas (defined in ../registration.cpp). `sizes` are samples per group (dim 0), not rows:
// static host ints that fix every shape and grid. Widths are data: int32 (G,) tensors on the activations' device.
// CPU kernels read and check their values (free on the host); CUDA kernels read them on the device, never on the
// host (no sync, graph-capturable), and clamp each to its bound (the tensor's channel count), so no value can address
// memory outside the tensors. Argument errors are ValueError / TypeError (TORCH_CHECK_VALUE / _TYPE) where they name
// metadata.
//   resnas::ext_rsr_im2col_fwd(Tensor u, int[] sizes, Tensor widths, int[] grid, int kernel_size, int stride,
//                              int padding, bool has_cls) -> Tensor cols
//       u (B, has_cls + H*W, C) -> cols (B, Ho*Wo, C*k*k); column c*k*k + kh*k + kw of output token (oh, ow) holds
//       u[b, has_cls + ih*W + iw, c] with ih = oh*stride - padding + kh (0 outside the grid: the conv's zero padding);
//       zero for c >= widths[g]. Channel-major / tap-minor, the order of F.unfold and of conv_weight.view(Co, -1), so
//       group g's conv weight W[:co, :ci] is the top-left block [:co, :ci*k*k] of that 2-D view.
//   resnas::ext_rsr_im2col_bwd(Tensor dcols, int[] sizes, Tensor widths, int[] grid, int kernel_size, int stride,
//                              int padding, bool has_cls) -> Tensor du
//       The adjoint (col2im) written as a gather: each input token sums, in a fixed tap order, the columns that read
//       it. du (B, has_cls + H*W, C) is zero on the cls row and beyond widths[g].
//   resnas::ext_rsr_conv_fwd(Tensor u, Tensor weight, int[] sizes, Tensor in_widths, Tensor out_widths, int[] grid,
//                            int kernel_size, int stride, int padding, bool has_cls, *, str route='auto')
//       -> Tensor conv                                                                                     (CPU only)
//       conv (B, Ho*Wo, Co) = the bias-free conv of u's patch tokens with weight = conv_weight.view(Co, C*k*k) (u's
//       dtype or fp32): group
//       g uses the block weight[:co, :ci*k*k], i.e. W[:co, :ci]; zero beyond co. Equals im2col_fwd then the ragged
//       GEMM, without materialising the columns (the CPU path of the fused RSR). route: 'auto' (oneDNN's conv for
//       fp32 where torch has oneDNN) or 'blocked' (the blocked implicit GEMM always; csrc/cpu/rsr_conv.cpp).
//   resnas::ext_rsr_conv_bwd(Tensor dout, Tensor u, Tensor weight, ...same...) -> (Tensor du, Tensor dweight)
//       du (B, has_cls + H*W, C) zero on the cls row and beyond ci; dweight (Co, C*k*k) in fp32 (fp64 for fp64).
//   resnas::ext_rsr_epilogue_fwd(Tensor conv, Tensor x, Tensor pos_embed, Tensor conv_bias, Tensor? cls,
//                                Tensor? cls_bias, int[] sizes, Tensor in_widths, Tensor out_widths, int[] grid,
//                                int stride) -> Tensor out
//       conv (B, L, Co) with L = Ho*Wo, Ho = ceil(H / stride); x (B, n + H*W, Ci) raw input, n = 1 when cls is given;
//       cls (B, 1, Co) the cls token's linear output (no bias). For c < co (zero beyond):
//         out[b, n + t, c] = conv[b, t, c] + conv_bias[c] + pos_embed[0, t, c] + (c < ci ? avgpool(x)[b, t, c] : 0)
//         out[b, 0, c]     = cls[b, 0, c] + cls_bias[c] + (c < ci ? x[b, 0, c] : 0)
//       avgpool: stride x stride windows without padding; a window cut by the grid's edge (odd grids, ceil_mode)
//       averages only the tokens inside the grid.
//   resnas::ext_rsr_epilogue_bwd(Tensor dout, int[] sizes, Tensor in_widths, Tensor out_widths, int[] grid, int stride,
//                                bool has_cls, int in_channels)
//       -> (Tensor dconv, Tensor dx, Tensor dpos, Tensor dconv_bias, Tensor dcls, Tensor dcls_bias)
//       dconv / dcls: dout's patch / cls rows masked to co; dx (B, n + H*W, in_channels): the pooling's adjoint plus
//       the cls shortcut, masked to ci; dpos (1, L, Co), dconv_bias (Co,), dcls_bias (Co,): sums over the batch in a
//       fixed order (deterministic), in fp32 (fp64 for fp64 dout). dcls / dcls_bias are empty (0,) without cls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "ragged.h"

namespace resnas {

// Spatial geometry of one RSR call. H, W: input grid; Ho, Wo: output grid; n_cls: 0 or 1 leading cls token.
struct RsrGeometry {
  int64_t H = 0, W = 0, Ho = 0, Wo = 0, k = 1, stride = 1, padding = 0, n_cls = 0;
  int64_t in_tokens() const { return n_cls + H * W; }
  int64_t out_patches() const { return Ho * Wo; }
  int64_t taps() const { return k * k; }
};

using RsrEpilogueBwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

namespace rsr_detail {

using ::resnas::acc_dtype;  // shared (ragged.h)
using ::resnas::is_supported_float;

inline std::pair<int64_t, int64_t> check_grid(c10::IntArrayRef grid, const char* op) {
  TORCH_CHECK(grid.size() == 2 && grid[0] > 0 && grid[1] > 0, op, ": grid must be two positive ints (H, W), got ",
              grid);
  return {grid[0], grid[1]};
}

// The conv's geometry (im2col): output side (side + 2p - k) / s + 1.
inline RsrGeometry conv_geometry(c10::IntArrayRef grid, int64_t k, int64_t stride, int64_t padding, bool has_cls,
                                 const char* op) {
  auto [H, W] = check_grid(grid, op);
  TORCH_CHECK(k >= 1 && stride >= 1 && padding >= 0, op, ": kernel_size and stride must be >= 1 and padding >= 0, got ",
              k, ", ", stride, ", ", padding);
  TORCH_CHECK(H + 2 * padding >= k && W + 2 * padding >= k, op, ": kernel_size ", k, " exceeds the padded grid (",
              H + 2 * padding, ", ", W + 2 * padding, ")");
  RsrGeometry g;
  g.H = H, g.W = W, g.k = k, g.stride = stride, g.padding = padding, g.n_cls = has_cls ? 1 : 0;
  g.Ho = (H + 2 * padding - k) / stride + 1;
  g.Wo = (W + 2 * padding - k) / stride + 1;
  return g;
}

// The pooled shortcut's geometry (epilogue): output side ceil(side / stride).
inline RsrGeometry pool_geometry(c10::IntArrayRef grid, int64_t stride, bool has_cls, const char* op) {
  auto [H, W] = check_grid(grid, op);
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  RsrGeometry g;
  g.H = H, g.W = W, g.k = stride, g.stride = stride, g.padding = 0, g.n_cls = has_cls ? 1 : 0;
  g.Ho = (H + stride - 1) / stride;
  g.Wo = (W + stride - 1) / stride;
  return g;
}

inline void check_tokens_tensor(const at::Tensor& t, const char* name, at::DeviceType device, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be 3-D (B, tokens, C), got shape ", t.sizes());
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must have dtype Float, Double, Half or BFloat16, got ", t.scalar_type());
  TORCH_CHECK(t.device().type() == device, op, ": ", name, " must be a ", device, " tensor, got ", t.device());
}

inline void check_param(const at::Tensor& p, const char* name, c10::IntArrayRef shape, const at::Tensor& x,
                        const char* op) {
  TORCH_CHECK(p.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(p.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", p.sizes());
  TORCH_CHECK(p.scalar_type() == x.scalar_type() || p.scalar_type() == at::kFloat, op, ": ", name,
              " must have dtype ", x.scalar_type(), " (like x) or Float, got ", p.scalar_type());
  TORCH_CHECK(p.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ", p.device());
}

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& x, const char* x_name,
                       const char* op) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of ", x_name, " (",
              x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x_name, "'s device ", x.device(), ", got ",
              t.device());
}

// Group table over the samples of `like` (dim 0) from a widths tensor. CPU: the values are read and checked against
// `bound` (free on the host). CUDA: only dtype / shape / device are checked and the table's widths stay 0: the
// values live on the device and are read there by the kernels (clamped to the bound), never on the host.
inline GroupTable rsr_group_table(c10::IntArrayRef sizes, const at::Tensor& widths, const at::Tensor& like,
                                  int64_t bound, const char* op, const char* widths_name, const char* tensor_name) {
  TORCH_CHECK_TYPE(widths.defined(), op, ": ", widths_name, " must be an int32 tensor, got None");
  check_widths_tensor(widths, static_cast<int64_t>(sizes.size()), like, op, widths_name, tensor_name);
  if (widths.device().is_cpu())
    return make_group_table(sizes, widths, like.size(0), bound, op, tensor_name, widths_name);
  const std::vector<int64_t> unread(sizes.size(), 0);
  return make_group_table(sizes, c10::IntArrayRef(unread), like.size(0), bound, op, tensor_name);
}

// Per-group in/out widths over samples: in_widths[g] <= out_widths[g] (the shortcut carries every input channel).
struct RsrGroups {
  GroupTable in;   // sample table (rows = samples) with the input widths (values on CPU only)
  GroupTable out;  // same samples, output widths
};

inline RsrGroups make_rsr_groups(c10::IntArrayRef sizes, const at::Tensor& in_widths, const at::Tensor& out_widths,
                                 const at::Tensor& like, const char* like_name, int64_t ci_max, int64_t co_max,
                                 const char* op) {
  RsrGroups g{rsr_group_table(sizes, in_widths, like, ci_max, op, "in_widths", like_name),
              rsr_group_table(sizes, out_widths, like, co_max, op, "out_widths", "the output (channels)")};
  if (in_widths.device().is_cpu()) {  // values known on the host: the shortcut rule (CUDA kernels need no such rule)
    for (int64_t i = 0; i < g.in.num_groups(); ++i) {
      TORCH_CHECK_VALUE(g.out.widths[i] >= g.in.widths[i], op, ": out_widths[", i, "]=", g.out.widths[i],
                        " must be >= in_widths[", i, "]=", g.in.widths[i],
                        " (the shortcut carries all input channels)");
    }
  }
  return g;
}


// ---- argument checks shared by the CPU and CUDA entry points ------------------------------------------------------
struct Im2colArgs {
  RsrGeometry geo;
  GroupTable groups;  // over samples, with the input widths
  int64_t channels;   // C (u's last dimension)
};

inline Im2colArgs check_im2col_fwd(const at::Tensor& u, c10::IntArrayRef sizes, const at::Tensor& widths,
                                   c10::IntArrayRef grid, int64_t k, int64_t stride, int64_t padding, bool has_cls,
                                   at::DeviceType device, const char* op) {
  check_tokens_tensor(u, "u", device, op);
  Im2colArgs a{conv_geometry(grid, k, stride, padding, has_cls, op), {}, u.size(2)};
  TORCH_CHECK(u.size(1) == a.geo.in_tokens(), op, ": u has ", u.size(1), " tokens but grid (", a.geo.H, ", ", a.geo.W,
              ") with has_cls=", (has_cls ? "True" : "False"), " needs ", a.geo.in_tokens());
  a.groups = rsr_group_table(sizes, widths, u, a.channels, op, "widths", "u");
  return a;
}

inline Im2colArgs check_im2col_bwd(const at::Tensor& dcols, c10::IntArrayRef sizes, const at::Tensor& widths,
                                   c10::IntArrayRef grid, int64_t k, int64_t stride, int64_t padding, bool has_cls,
                                   at::DeviceType device, const char* op) {
  check_tokens_tensor(dcols, "dcols", device, op);
  Im2colArgs a{conv_geometry(grid, k, stride, padding, has_cls, op), {}, 0};
  TORCH_CHECK(dcols.size(1) == a.geo.out_patches(), op, ": dcols has ", dcols.size(1),
              " tokens but the conv maps grid (", a.geo.H, ", ", a.geo.W, ") to ", a.geo.Ho, " x ", a.geo.Wo);
  TORCH_CHECK(dcols.size(2) % a.geo.taps() == 0, op, ": dcols' last dimension (", dcols.size(2),
              ") must be a multiple of kernel_size^2 = ", a.geo.taps());
  a.channels = dcols.size(2) / a.geo.taps();
  a.groups = rsr_group_table(sizes, widths, dcols, a.channels, op, "widths", "dcols (channels)");
  return a;
}

struct EpilogueArgs {
  RsrGeometry geo;
  RsrGroups groups;
  int64_t ci_max, co_max;
};

inline EpilogueArgs check_epilogue_fwd(const at::Tensor& conv, const at::Tensor& x, const at::Tensor& pos_embed,
                                       const at::Tensor& conv_bias, const std::optional<at::Tensor>& cls,
                                       const std::optional<at::Tensor>& cls_bias, c10::IntArrayRef sizes,
                                       const at::Tensor& in_widths, const at::Tensor& out_widths,
                                       c10::IntArrayRef grid, int64_t stride, at::DeviceType device, const char* op) {
  check_tokens_tensor(x, "x", device, op);
  check_tokens_tensor(conv, "conv", device, op);
  check_same(conv, "conv", x, "x", op);
  const bool has_cls = cls.has_value() && cls->defined();
  const bool has_cls_bias = cls_bias.has_value() && cls_bias->defined();
  TORCH_CHECK(has_cls == has_cls_bias, op, ": cls and cls_bias must be given together (cls ",
              has_cls ? "given" : "missing", ", cls_bias ", has_cls_bias ? "given" : "missing", ")");
  EpilogueArgs a;
  a.geo = pool_geometry(grid, stride, has_cls, op);
  a.ci_max = x.size(2);
  a.co_max = conv.size(2);
  TORCH_CHECK(x.size(1) == a.geo.in_tokens(), op, ": x has ", x.size(1), " tokens but grid (", a.geo.H, ", ", a.geo.W,
              ") with has_cls=", (has_cls ? "True" : "False"), " needs ", a.geo.in_tokens());
  TORCH_CHECK(conv.size(0) == x.size(0) && conv.size(1) == a.geo.out_patches(), op, ": conv must have shape (",
              x.size(0), ", ", a.geo.out_patches(), ", Co) (batch of x, output grid ", a.geo.Ho, " x ", a.geo.Wo,
              "), got ", conv.sizes());
  TORCH_CHECK(a.co_max >= a.ci_max, op, ": conv has ", a.co_max, " channels, fewer than x's ", a.ci_max);
  check_param(pos_embed, "pos_embed", {1, a.geo.out_patches(), a.co_max}, x, op);
  check_param(conv_bias, "conv_bias", {a.co_max}, x, op);
  if (has_cls) {
    TORCH_CHECK(cls->sizes() == c10::IntArrayRef({x.size(0), 1, a.co_max}), op, ": cls must have shape (", x.size(0),
                ", 1, ", a.co_max, "), got ", cls->sizes());
    check_same(*cls, "cls", x, "x", op);
    check_param(*cls_bias, "cls_bias", {a.co_max}, x, op);
  }
  a.groups = make_rsr_groups(sizes, in_widths, out_widths, x, "x", a.ci_max, a.co_max, op);
  return a;
}

inline EpilogueArgs check_epilogue_bwd(const at::Tensor& dout, c10::IntArrayRef sizes, const at::Tensor& in_widths,
                                       const at::Tensor& out_widths, c10::IntArrayRef grid, int64_t stride,
                                       bool has_cls, int64_t in_channels, at::DeviceType device, const char* op) {
  check_tokens_tensor(dout, "dout", device, op);
  EpilogueArgs a;
  a.geo = pool_geometry(grid, stride, has_cls, op);
  a.ci_max = in_channels;
  a.co_max = dout.size(2);
  TORCH_CHECK(dout.size(1) == a.geo.n_cls + a.geo.out_patches(), op, ": dout has ", dout.size(1),
              " tokens but the output grid ", a.geo.Ho, " x ", a.geo.Wo, " with has_cls=", (has_cls ? "True" : "False"),
              " needs ", a.geo.n_cls + a.geo.out_patches());
  TORCH_CHECK(in_channels >= 0 && in_channels <= a.co_max, op, ": in_channels must lie in [0, ", a.co_max,
              "] (dout's channels), got ", in_channels);
  a.groups = make_rsr_groups(sizes, in_widths, out_widths, dout, "in_channels", a.ci_max, a.co_max, op);
  return a;
}

}  // namespace rsr_detail

// ---- CUDA launch metadata ------------------------------------------------------------------------------------------
// The static part of the groups (where each group's samples end) is passed to CUDA kernels by value, at most
// kRsrMaxGroupsPerLaunch groups per launch (a batch with more groups is processed in chunks of consecutive groups:
// groups own contiguous samples). The widths stay in device memory (int32 tensors) and are read by the kernels,
// clamped to the static bounds. No host-to-device copy and no host read: launches never sync, a captured CUDA graph
// replays with new widths written into the same tensors.
constexpr int kRsrMaxGroupsPerLaunch = 32;

struct RsrGroupChunk {
  int64_t sample_begin = 0;                       // first sample of the chunk
  int64_t sample_end[kRsrMaxGroupsPerLaunch];     // exclusive end sample of each group of the chunk (absolute)
  int32_t group_begin = 0;                        // index of the chunk's first group in the widths tensors
  int32_t count = 0;
  int64_t samples() const { return count ? sample_end[count - 1] - sample_begin : 0; }
};

// Chunks of at most kRsrMaxGroupsPerLaunch consecutive groups, in group order (empty chunks included: callers skip
// chunks without samples, except where a kernel must run anyway). Uses the row starts only.
inline std::vector<RsrGroupChunk> rsr_group_chunks(const GroupTable& table) {
  std::vector<RsrGroupChunk> chunks;
  const int64_t G = table.num_groups();
  for (int64_t g0 = 0; g0 < G; g0 += kRsrMaxGroupsPerLaunch) {
    RsrGroupChunk c;
    c.sample_begin = table.row_start[g0];
    c.group_begin = static_cast<int32_t>(g0);
    const int64_t g1 = std::min<int64_t>(G, g0 + kRsrMaxGroupsPerLaunch);
    for (int64_t g = g0; g < g1; ++g) c.sample_end[g - g0] = table.row_start[g + 1];
    for (int64_t g = g1 - g0; g < kRsrMaxGroupsPerLaunch; ++g) c.sample_end[g] = c.sample_end[g1 - g0 - 1];
    c.count = static_cast<int32_t>(g1 - g0);
    chunks.push_back(c);
  }
  return chunks;
}

#if defined(__CUDACC__)
// A width read from device memory, clamped to [0, bound]: whatever the tensor holds, no access leaves the tensors.
__device__ __forceinline__ int rsr_clamped_width(const int32_t* widths, int64_t g, int64_t bound) {
  return static_cast<int>(min(max(static_cast<int64_t>(widths[g]), int64_t(0)), bound));
}

// (in width, out width) of `sample`, which must lie in the chunk, clamped to [0, ci_bound] / [0, co_bound]. The group
// search is unrolled with compile-time indices so the chunk stays in the kernel-parameter bank.
__device__ __forceinline__ void rsr_chunk_widths(const RsrGroupChunk& chunk, int64_t sample, const int32_t* in_widths,
                                                 const int32_t* out_widths, int64_t ci_bound, int64_t co_bound,
                                                 int& ci, int& co) {
  int local = 0;
#pragma unroll
  for (int g = kRsrMaxGroupsPerLaunch - 1; g >= 0; --g) {
    if (g < chunk.count && sample < chunk.sample_end[g]) local = g;
  }
  ci = rsr_clamped_width(in_widths, chunk.group_begin + local, ci_bound);
  co = rsr_clamped_width(out_widths, chunk.group_begin + local, co_bound);
}
#endif

// CPU entry points (csrc/cpu/rsr_im2col.cpp, csrc/cpu/rsr_epilogue.cpp); the conv's are local to rsr_conv.cpp.
at::Tensor rsr_im2col_fwd_cpu(const at::Tensor& u, c10::IntArrayRef sizes, const at::Tensor& widths,
                              c10::IntArrayRef grid, int64_t kernel_size, int64_t stride, int64_t padding,
                              bool has_cls);
at::Tensor rsr_im2col_bwd_cpu(const at::Tensor& dcols, c10::IntArrayRef sizes, const at::Tensor& widths,
                              c10::IntArrayRef grid, int64_t kernel_size, int64_t stride, int64_t padding,
                              bool has_cls);
at::Tensor rsr_epilogue_fwd_cpu(const at::Tensor& conv, const at::Tensor& x, const at::Tensor& pos_embed,
                                const at::Tensor& conv_bias, const std::optional<at::Tensor>& cls,
                                const std::optional<at::Tensor>& cls_bias, c10::IntArrayRef sizes,
                                const at::Tensor& in_widths, const at::Tensor& out_widths, c10::IntArrayRef grid,
                                int64_t stride);
RsrEpilogueBwdOut rsr_epilogue_bwd_cpu(const at::Tensor& dout, c10::IntArrayRef sizes, const at::Tensor& in_widths,
                                       const at::Tensor& out_widths, c10::IntArrayRef grid, int64_t stride,
                                       bool has_cls, int64_t in_channels);

}  // namespace resnas
