// Every schema of the `resnas` op library, in one place. The kernels register their implementations for their own
// dispatch keys in their own files (TORCH_LIBRARY_IMPL: CPU in csrc/cpu/*.cpp, CUDA in csrc/cuda/*.cu, Autograd and
// CompositeExplicitAutograd next to each op's autograd Function), so no backend file depends on another one being
// compiled in: a build without csrc/cpu, or without csrc/cuda, still defines every op. TORCH_LIBRARY (not a fragment)
// makes a second definition of the namespace in C++ a load-time error.
//
// Each group of ops: the public op of the C++ backends (one dispatcher call per use from Python), then the device
// kernels ext_*_fwd / _bwd that its autograd Function calls. Semantics are documented with the kernels' declarations.
#include <torch/library.h>

TORCH_LIBRARY(resnas, m) {
  // ragged_layer_norm.h; public op: ragged_layer_norm.cpp
  m.def(
      "ragged_layer_norm(Tensor x, Tensor weight, Tensor bias, int[] sizes, Tensor widths, float eps, "
      "Tensor? residual=None) -> (Tensor y, Tensor z)");
  m.def(
      "ext_ragged_layer_norm_fwd(Tensor x, Tensor? residual, Tensor weight, Tensor bias, int[] row_counts, "
      "Tensor widths, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ext_ragged_layer_norm_bwd(Tensor dy, Tensor? dz, Tensor z, Tensor weight, Tensor mean, Tensor rstd, "
      "int[] row_counts, Tensor widths) -> (Tensor, Tensor, Tensor)");

  // cpu/ragged_linear.cpp
  m.def(
      "ragged_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor? row_scale, int[] sizes, "
      "Tensor in_widths, Tensor out_widths, int segments=1, str? activation=None) -> Tensor");
  m.def(
      "ext_ragged_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor? row_scale, "
      "int[] sizes, Tensor in_widths, Tensor out_widths, int segments, bool gelu, bool save_pre) -> (Tensor, Tensor)");
  m.def(
      "ext_ragged_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor? pre, Tensor? row_scale, int[] sizes, "
      "Tensor in_widths, Tensor out_widths, int segments, bool gelu, bool has_bias, bool has_residual) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // ragged_attention.h; public op: cpu/ragged_attention.cpp
  m.def(
      "ragged_attention(Tensor q, Tensor k, Tensor v, Tensor? bias_table, Tensor? bias_index, Tensor? dense_bias, "
      "int[] sizes, Tensor widths, float scale, int[] grid) -> Tensor");
  m.def(
      "ext_ragged_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias_table, Tensor? bias_index, "
      "Tensor? dense_bias, int[] sizes, Tensor widths, float scale, int[] grid) -> (Tensor, Tensor)");
  m.def(
      "ext_ragged_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? bias_table, Tensor? bias_index, Tensor? dense_bias, int[] sizes, Tensor widths, float scale, "
      "int[] grid, bool need_table_grad, bool need_dense_grad, int chunk) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // rsr.h; public ops: rsr.cpp. `route` picks the CPU conv's algorithm: 'auto' (oneDNN's convolution for fp32 where
  // torch has oneDNN, else the blocked implicit GEMM) or 'blocked' (always the blocked implicit GEMM). Python passes
  // the runtime choice (RESNAS_RSR_CONV), so the kernels never read the environment.
  m.def(
      "rsr_im2col(Tensor u, int[] sizes, Tensor widths, int[] grid, int kernel_size, int stride, int padding, "
      "bool has_cls) -> Tensor");
  m.def(
      "rsr_conv(Tensor u, Tensor weight, int[] sizes, Tensor in_widths, Tensor out_widths, int[] grid, "
      "int kernel_size, int stride, int padding, bool has_cls, *, str route='auto') -> Tensor");
  m.def(
      "rsr_epilogue(Tensor conv, Tensor x, Tensor pos_embed, Tensor conv_bias, Tensor? cls, Tensor? cls_bias, "
      "int[] sizes, Tensor in_widths, Tensor out_widths, int[] grid, int stride) -> Tensor");
  m.def(
      "ext_rsr_im2col_fwd(Tensor u, int[] sizes, Tensor widths, int[] grid, int kernel_size, int stride, "
      "int padding, bool has_cls) -> Tensor");
  m.def(
      "ext_rsr_im2col_bwd(Tensor dcols, int[] sizes, Tensor widths, int[] grid, int kernel_size, int stride, "
      "int padding, bool has_cls) -> Tensor");
  m.def(
      "ext_rsr_conv_fwd(Tensor u, Tensor weight, int[] sizes, Tensor in_widths, Tensor out_widths, int[] grid, "
      "int kernel_size, int stride, int padding, bool has_cls, *, str route='auto') -> Tensor");
  m.def(
      "ext_rsr_conv_bwd(Tensor dout, Tensor u, Tensor weight, int[] sizes, Tensor in_widths, Tensor out_widths, "
      "int[] grid, int kernel_size, int stride, int padding, bool has_cls, *, str route='auto') -> (Tensor, Tensor)");
  m.def(
      "ext_rsr_epilogue_fwd(Tensor conv, Tensor x, Tensor pos_embed, Tensor conv_bias, Tensor? cls, "
      "Tensor? cls_bias, int[] sizes, Tensor in_widths, Tensor out_widths, int[] grid, int stride) -> Tensor");
  m.def(
      "ext_rsr_epilogue_bwd(Tensor dout, int[] sizes, Tensor in_widths, Tensor out_widths, int[] grid, int stride, "
      "bool has_cls, int in_channels) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
