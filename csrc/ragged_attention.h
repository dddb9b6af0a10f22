// Ragged multi-head attention with a LeViT bias table: shared declarations and argument checks of the CPU
// (csrc/cpu/ragged_attention.cpp) and CUDA (csrc/cuda/ragged_attention_fwd.cu) kernels.
//
// Schemas (defined in registration.cpp):
//   resnas::ragged_attention(Tensor q, Tensor k, Tensor v, Tensor? bias_table, Tensor? bias_index,
//       Tensor? dense_bias, int[] sizes, Tensor widths, float scale, int[] grid) -> Tensor
//     The public op of the C++ backend: one dispatcher hop. Its Autograd kernel (a torch::autograd::Function) calls
//     the two kernels below through the dispatcher, so torch.compile traces them (their fake kernels are registered
//     from Python); a CompositeExplicitAutograd kernel is the forward without autograd.
//   resnas::ext_ragged_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias_table, Tensor? bias_index,
//       Tensor? dense_bias, int[] sizes, Tensor widths, float scale, int[] grid) -> (Tensor out, Tensor lse)
//   resnas::ext_ragged_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
//       Tensor? bias_table, Tensor? bias_index, Tensor? dense_bias, int[] sizes, Tensor widths, float scale,
//       int[] grid, bool need_table_grad, bool need_dense_grad, int chunk)
//       -> (Tensor dq, Tensor dk, Tensor dv, Tensor dtable, Tensor ddense)
// Semantics are those of `_reference_fwd` / `_reference_bwd` in resnas_kernels/ops/ragged_attention.py:
//   - q (B, Nq, H, Dqk), k (B, Nk, H, Dqk), v (B, Nk, H, Dv): unit stride on the last dim, any other strides.
//   - sample group g (sizes[g] consecutive samples, static) runs heads [0, widths[g]); other heads give zeros
//     everywhere. widths is device metadata: an int32 (G,) tensor on q's device. The CPU kernels read and check its
//     values (free on the host); the CUDA kernel reads them on the device and clamps them to [0, H], never on the host.
//   - bias: table (H, T) with index (Nq, Nk) in [0, T) or grid = [R, s] (LeViT: index |dy|*R + |dx| of the query
//     grid point (s*(q / R'), s*(q % R')), R' = (R-1)/s + 1, and key (j / R, j % R)); or dense (1|H, Nq, Nk) or
//     (B, H, Nq, Nk). The bias is added to the scaled scores.
//   - out (B, Nq, H*Dv) in q's dtype; lse (B, H, Nq) fp32 (fp64 for fp64 inputs), 0 for inactive heads.
//   - backward: dq/dk/dv contiguous like q/k/v; dtable (H, T) in the table's dtype (empty unless need_table_grad);
//     ddense like dense_bias (empty unless need_dense_grad). Bias gradients are summed per (chunk of `chunk`
//     samples, head) task sequentially, then over chunks in a fixed order: deterministic for a given shape.
// Argument errors are ValueError / TypeError in Python, worded as the Python checks of `ragged_attention` word them
// (the public function leaves the checks of the C++ path to this header).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "ragged.h"

namespace resnas {

using AttentionFwdOut = std::tuple<at::Tensor, at::Tensor>;
using AttentionBwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Shapes and bias kind of one call, after validation.
struct AttentionShape {
  int64_t B = 0, Nq = 0, Nk = 0, H = 0, Dqk = 0, Dv = 0;
  int64_t T = 0;                    // table columns (0 without a table)
  int64_t grid_r = 0, grid_s = 0;   // LeViT grid (0 without)
  int64_t dense_lead = 0;           // 0: no dense bias, 1: (1, Nq, Nk), H: (H, Nq, Nk), -1: (B, H, Nq, Nk)
};

namespace attention_detail {

inline bool is_index_type(at::ScalarType t) {
  return t == at::kInt || t == at::kLong || t == at::kShort || t == at::kChar || t == at::kByte;
}

using ::resnas::acc_dtype;  // shared (ragged.h)
using ::resnas::is_supported_float;

inline void check_qkv_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), name, " must be a torch.Tensor, got None");
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D (B, N, H_max, d), got shape ", py_shape(t.sizes()));
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), name,
                   " must have dtype in ['torch.float32', 'torch.float16', 'torch.bfloat16', 'torch.float64'], got ",
                   py_dtype(t.scalar_type()));
  TORCH_CHECK_VALUE(t.size(3) <= 1 || t.stride(3) == 1, name,
                    " must have unit stride on its last (head) dim, got strides ", py_shape(t.strides()),
                    "; other strides may be arbitrary (views of a qkv tensor are fine)");
}

inline void check_same_device(const at::Tensor& q, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " must be on the same device as q: q is on ", q.device(), ", ",
                    name, " is on ", t.device());
}

// The checks of `ragged_attention` (resnas_kernels/ops/ragged_attention.py: _check_qkv, check_groups, _check_bias),
// in the same order and words. The widths tensor's dtype, shape and device are checked; its values are not read
// here (the CPU kernels read them in make_group_table, the CUDA kernel clamps them on the device).
inline AttentionShape check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& index,
                                 const std::optional<at::Tensor>& dense, c10::IntArrayRef sizes,
                                 const at::Tensor& widths, double scale, c10::IntArrayRef grid,
                                 at::DeviceType device, const char* op) {
  check_qkv_tensor(q, "q");
  check_qkv_tensor(k, "k");
  check_qkv_tensor(v, "v");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k, "k"}, {v, "v"}}) {
    check_same_device(q, t, name);
    TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " must have q's dtype (", py_dtype(q.scalar_type()),
                     "), got ", py_dtype(t.scalar_type()));
  }
  TORCH_CHECK_VALUE(q.device().type() == device, op, ": q must be a ", device, " tensor, got ", q.device());
  AttentionShape s;
  s.B = q.size(0); s.Nq = q.size(1); s.H = q.size(2); s.Dqk = q.size(3);
  s.Nk = k.size(1); s.Dv = v.size(3);
  const auto names = "q (B, Nq, H_max, d_qk), k (B, Nk, H_max, d_qk), v (B, Nk, H_max, d_v)";
  const std::string got = "got q " + py_shape(q.sizes()) + ", k " + py_shape(k.sizes()) + ", v " + py_shape(v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == s.B && v.size(0) == s.B,
                    "q, k and v must have the same batch size (dim 0): expected ", names, ", ", got);
  TORCH_CHECK_VALUE(k.size(2) == s.H && v.size(2) == s.H,
                    "q, k and v must have the same number of heads H_max (dim 2): expected ", names, ", ", got);
  TORCH_CHECK_VALUE(k.size(3) == s.Dqk, "q and k must have the same head dim d_qk (dim 3): expected ", names, ", ",
                    got);
  TORCH_CHECK_VALUE(v.size(1) == s.Nk, "k and v must have the same number of keys Nk (dim 1): expected ", names, ", ",
                    got);
  TORCH_CHECK_VALUE(s.Nq >= 1 && s.Nk >= 1 && s.Dqk >= 1 && s.Dv >= 1, "Nq, Nk, d_qk and d_v must be >= 1, ", got);

  TORCH_CHECK_VALUE(!sizes.empty(), "sizes must name at least one group, got an empty sequence");
  int64_t batch = 0;
  for (size_t g = 0; g < sizes.size(); ++g) {
    TORCH_CHECK_VALUE(sizes[g] >= 0, "sizes[", g, "] must be >= 0, got ", sizes[g]);
    batch += sizes[g];
  }
  TORCH_CHECK_VALUE(batch == s.B, "sum of group sizes (", batch, ", sizes=", py_shape(sizes),
                    ") must equal the batch size of q (dim 0: ", s.B, ")");
  check_widths_tensor(widths, static_cast<int64_t>(sizes.size()), q, op, "widths", "q");
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be a finite float, got ", scale);

  const bool has_table = table.has_value() && table->defined();
  const bool has_index = index.has_value() && index->defined();
  const bool has_dense = dense.has_value() && dense->defined();
  const auto float_or_q = [&](at::ScalarType t) { return t == q.scalar_type() || t == at::kFloat; };
  TORCH_CHECK_VALUE(!(has_table && has_dense),
                    "give at most one bias: bias_table (with bias_index or bias_grid) or dense_bias, not both");
  TORCH_CHECK_VALUE(grid.empty() || grid.size() == 2, "bias_grid must be a pair of ints (R, stride) >= 1, got ",
                    grid);
  if (!has_table) {
    TORCH_CHECK_VALUE(!has_index && grid.empty(),
                      "bias_index / bias_grid index a bias_table, but bias_table is None");
  } else {
    TORCH_CHECK_VALUE(table->dim() == 2 && table->size(0) == s.H && table->size(1) >= 1,
                      "bias_table must have shape (H_max, T) = (", s.H, ", T >= 1) (H_max = q.shape[2]), got ",
                      py_shape(table->sizes()));
    TORCH_CHECK_TYPE(float_or_q(table->scalar_type()), "bias_table must have q's dtype (", py_dtype(q.scalar_type()),
                     ") or float32, got ", py_dtype(table->scalar_type()));
    check_same_device(q, *table, "bias_table");
    s.T = table->size(1);
    TORCH_CHECK_VALUE(has_index != !grid.empty(),
                      "with bias_table, give exactly one of bias_index (Nq, Nk) or bias_grid (R, stride), got ",
                      has_index ? "both" : "neither");
    if (has_index) {
      TORCH_CHECK_VALUE(index->dim() == 2 && index->size(0) == s.Nq && index->size(1) == s.Nk,
                        "bias_index must have shape (Nq, Nk) = (", s.Nq, ", ", s.Nk, "), got ",
                        py_shape(index->sizes()));
      TORCH_CHECK_TYPE(is_index_type(index->scalar_type()),
                       "bias_index must be an integer tensor (int64 or int32), got ", py_dtype(index->scalar_type()));
      check_same_device(q, *index, "bias_index");
    } else {
      s.grid_r = grid[0];
      s.grid_s = grid[1];
      TORCH_CHECK_VALUE(s.grid_r >= 1 && s.grid_s >= 1, "bias_grid must be a pair of ints (R, stride) >= 1, got (",
                        s.grid_r, ", ", s.grid_s, ")");
      const int64_t r = s.grid_r, rq = (r - 1) / s.grid_s + 1;
      TORCH_CHECK_VALUE(s.Nk == r * r && s.Nq == rq * rq, "bias_grid=(", r, ", ", s.grid_s, ") means Nk = R^2 = ",
                        r * r, " keys and Nq = ((R-1)//s+1)^2 = ", rq * rq, " queries, got Nq=", s.Nq, ", Nk=", s.Nk);
      TORCH_CHECK_VALUE(s.T >= r * r, "bias_grid=(", r, ", ", s.grid_s, ") indexes offsets up to R^2 - 1 = ",
                        r * r - 1, ", so bias_table needs T >= ", r * r, " columns, got T=", s.T);
    }
  }
  if (has_dense) {
    const bool ok3 = dense->dim() == 3 && (dense->size(0) == 1 || dense->size(0) == s.H) &&
                     dense->size(1) == s.Nq && dense->size(2) == s.Nk;
    const bool ok4 = dense->dim() == 4 && dense->size(0) == s.B && dense->size(1) == s.H &&
                     dense->size(2) == s.Nq && dense->size(3) == s.Nk;
    TORCH_CHECK_VALUE(ok3 || ok4, "dense_bias must have shape (1 or H_max, Nq, Nk) = (1|", s.H, ", ", s.Nq, ", ",
                      s.Nk, ") or (B, H_max, Nq, Nk) = (", s.B, ", ", s.H, ", ", s.Nq, ", ", s.Nk, "), got ",
                      py_shape(dense->sizes()));
    TORCH_CHECK_TYPE(float_or_q(dense->scalar_type()), "dense_bias must have q's dtype (", py_dtype(q.scalar_type()),
                     ") or float32, got ", py_dtype(dense->scalar_type()));
    check_same_device(q, *dense, "dense_bias");
    s.dense_lead = ok4 ? -1 : dense->size(0);
  }
  return s;
}

// The backward's extra tensors: dout and out (B, Nq, H*Dv) in q's dtype, lse (B, H, Nq) in the accumulation dtype.
inline void check_bwd_args(const AttentionShape& s, const at::Tensor& q, const at::Tensor& dout, const at::Tensor& out,
                           const at::Tensor& lse) {
  const std::vector<int64_t> out_shape{s.B, s.Nq, s.H * s.Dv};
  const std::vector<int64_t> lse_shape{s.B, s.H, s.Nq};
  const at::ScalarType acc = acc_dtype(q.scalar_type());
  for (const auto& [t, name, shape, dtype] :
       {std::tuple<const at::Tensor&, const char*, c10::IntArrayRef, at::ScalarType>{dout, "dout", out_shape,
                                                                                      q.scalar_type()},
        {out, "out", out_shape, q.scalar_type()},
        {lse, "lse", lse_shape, acc}}) {
    TORCH_CHECK_TYPE(t.defined(), name, " must be a torch.Tensor, got None");
    TORCH_CHECK_VALUE(t.sizes() == shape && t.scalar_type() == dtype, name, " must have shape ", py_shape(shape),
                      " and dtype ", py_dtype(dtype), ", got ", py_shape(t.sizes()), " ", py_dtype(t.scalar_type()));
    check_same_device(q, t, name);
  }
}

}  // namespace attention_detail

AttentionFwdOut ragged_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const std::optional<at::Tensor>& bias_table,
                                         const std::optional<at::Tensor>& bias_index,
                                         const std::optional<at::Tensor>& dense_bias, c10::IntArrayRef sizes,
                                         const at::Tensor& widths, double scale, c10::IntArrayRef grid);

AttentionBwdOut ragged_attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                         const std::optional<at::Tensor>& bias_table,
                                         const std::optional<at::Tensor>& bias_index,
                                         const std::optional<at::Tensor>& dense_bias, c10::IntArrayRef sizes,
                                         const at::Tensor& widths, double scale, c10::IntArrayRef grid,
                                         bool need_table_grad, bool need_dense_grad, int64_t chunk);

}  // namespace resnas
