// Ragged multi-head attention with a LeViT bias table: shared declarations and argument checks of the CPU
// (csrc/cpu/ragged_attention.cpp) and CUDA (csrc/cuda/ragged_attention_fwd.cu) kernels.
//
// Schema (defined in the CPU file, which every build compiles):
//   resnas::ext_ragged_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias_table, Tensor? bias_index,
//       Tensor? dense_bias, int[] sizes, int[] widths, float scale, int[] grid) -> (Tensor out, Tensor lse)
//   resnas::ext_ragged_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
//       Tensor? bias_table, Tensor? bias_index, Tensor? dense_bias, int[] sizes, int[] widths, float scale,
//       int[] grid, bool need_table_grad, bool need_dense_grad, int chunk)
//       -> (Tensor dq, Tensor dk, Tensor dv, Tensor dtable, Tensor ddense)
// Semantics are those of `_reference_fwd` / `_reference_bwd` in resnas_kernels/ops/ragged_attention.py:
//   - q (B, Nq, H, Dqk), k (B, Nk, H, Dqk), v (B, Nk, H, Dv): unit stride on the last dim, any other strides.
//   - sample group g (sizes[g] consecutive samples) runs heads [0, widths[g]); other heads give zeros everywhere.
//   - bias: table (H, T) with index (Nq, Nk) in [0, T) or grid = [R, s] (LeViT: index |dy|*R + |dx| of the query
//     grid point (s*(q / R'), s*(q % R')), R' = (R-1)/s + 1, and key (j / R, j % R)); or dense (1|H, Nq, Nk) or
//     (B, H, Nq, Nk). The bias is added to the scaled scores.
//   - out (B, Nq, H*Dv) in q's dtype; lse (B, H, Nq) fp32 (fp64 for fp64 inputs), 0 for inactive heads.
//   - backward: dq/dk/dv contiguous like q/k/v; dtable (H, T) in the table's dtype (empty unless need_table_grad);
//     ddense like dense_bias (empty unless need_dense_grad). Bias gradients are summed per (chunk of `chunk`
//     samples, head) task sequentially, then over chunks in a fixed order: deterministic for a given shape.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
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
  std::vector<int64_t> sample_heads;  // active heads of every sample (length B)
};

namespace attention_detail {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline bool is_index_type(at::ScalarType t) {
  return t == at::kInt || t == at::kLong || t == at::kShort || t == at::kChar || t == at::kByte;
}

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_qkv_tensor(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (B, N, H, d), got shape ", t.sizes());
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must have dtype Float, Double, Half or BFloat16, got ", t.scalar_type());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, op, ": ", name,
              " must have unit stride on its last (head) dim, got strides ", t.strides());
}

inline AttentionShape check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& index,
                                 const std::optional<at::Tensor>& dense, c10::IntArrayRef sizes,
                                 c10::IntArrayRef widths, double scale, c10::IntArrayRef grid,
                                 at::DeviceType device, const char* op) {
  check_qkv_tensor(q, "q", op);
  check_qkv_tensor(k, "k", op);
  check_qkv_tensor(v, "v", op);
  TORCH_CHECK(q.device().type() == device, op, ": q must be a ", device, " tensor, got ", q.device());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k, "k"}, {v, "v"}}) {
    TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
                ", got ", t.scalar_type());
  }
  AttentionShape s;
  s.B = q.size(0); s.Nq = q.size(1); s.H = q.size(2); s.Dqk = q.size(3);
  s.Nk = k.size(1); s.Dv = v.size(3);
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B, op, ": q, k, v must have the same batch size, got ", q.sizes(),
              ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.size(2) == s.H && v.size(2) == s.H, op, ": q, k, v must have the same number of heads, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.size(3) == s.Dqk, op, ": q and k must have the same head dim, got ", q.sizes(), ", ", k.sizes());
  TORCH_CHECK(v.size(1) == s.Nk, op, ": k and v must have the same number of keys, got ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(s.Nq >= 1 && s.Nk >= 1 && s.Dqk >= 1 && s.Dv >= 1, op, ": Nq, Nk, d_qk and d_v must be >= 1, got q ",
              q.sizes(), ", v ", v.sizes());
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  const GroupTable groups = make_group_table(sizes, widths, s.B, s.H, op, "q (heads)");
  s.sample_heads.reserve(s.B);
  for (int64_t g = 0; g < groups.num_groups(); ++g)
    for (int64_t i = 0; i < groups.rows(g); ++i) s.sample_heads.push_back(groups.widths[g]);

  const bool has_table = table.has_value() && table->defined();
  const bool has_index = index.has_value() && index->defined();
  const bool has_dense = dense.has_value() && dense->defined();
  TORCH_CHECK(!(has_table && has_dense), op, ": give at most one of bias_table and dense_bias");
  TORCH_CHECK(grid.empty() || grid.size() == 2, op, ": grid must be [] or [R, stride], got ", grid);
  if (has_table) {
    TORCH_CHECK(table->dim() == 2 && table->size(0) == s.H && table->size(1) >= 1, op,
                ": bias_table must have shape (H, T) = (", s.H, ", T >= 1), got ", table->sizes());
    TORCH_CHECK(is_supported_float(table->scalar_type()), op, ": bias_table must be a float tensor, got ",
                table->scalar_type());
    TORCH_CHECK(table->device() == q.device(), op, ": bias_table must be on q's device ", q.device(), ", got ",
                table->device());
    s.T = table->size(1);
    TORCH_CHECK(has_index != !grid.empty(), op, ": with bias_table give exactly one of bias_index or grid");
    if (has_index) {
      TORCH_CHECK(index->dim() == 2 && index->size(0) == s.Nq && index->size(1) == s.Nk, op,
                  ": bias_index must have shape (Nq, Nk) = (", s.Nq, ", ", s.Nk, "), got ", index->sizes());
      TORCH_CHECK(is_index_type(index->scalar_type()), op, ": bias_index must be an integer tensor, got ",
                  index->scalar_type());
      TORCH_CHECK(index->device() == q.device(), op, ": bias_index must be on q's device ", q.device(), ", got ",
                  index->device());
    } else {
      s.grid_r = grid[0];
      s.grid_s = grid[1];
      TORCH_CHECK(s.grid_r >= 1 && s.grid_s >= 1, op, ": grid [R, stride] must be >= 1, got ", grid);
      const int64_t rq = (s.grid_r - 1) / s.grid_s + 1;
      TORCH_CHECK(s.Nk == s.grid_r * s.grid_r && s.Nq == rq * rq, op, ": grid [", s.grid_r, ", ", s.grid_s,
                  "] needs Nk = ", s.grid_r * s.grid_r, " and Nq = ", rq * rq, ", got Nq = ", s.Nq, ", Nk = ", s.Nk);
      TORCH_CHECK(s.T >= s.grid_r * s.grid_r, op, ": grid [", s.grid_r, ", ", s.grid_s, "] needs bias_table with T >= ",
                  s.grid_r * s.grid_r, " columns, got T = ", s.T);
    }
  } else {
    TORCH_CHECK(!has_index && grid.empty(), op, ": bias_index / grid given without bias_table");
  }
  if (has_dense) {
    TORCH_CHECK(is_supported_float(dense->scalar_type()), op, ": dense_bias must be a float tensor, got ",
                dense->scalar_type());
    TORCH_CHECK(dense->device() == q.device(), op, ": dense_bias must be on q's device ", q.device(), ", got ",
                dense->device());
    const bool ok3 = dense->dim() == 3 && (dense->size(0) == 1 || dense->size(0) == s.H) &&
                     dense->size(1) == s.Nq && dense->size(2) == s.Nk;
    const bool ok4 = dense->dim() == 4 && dense->size(0) == s.B && dense->size(1) == s.H &&
                     dense->size(2) == s.Nq && dense->size(3) == s.Nk;
    TORCH_CHECK(ok3 || ok4, op, ": dense_bias must have shape (1|H, Nq, Nk) or (B, H, Nq, Nk) with B = ", s.B,
                ", H = ", s.H, ", Nq = ", s.Nq, ", Nk = ", s.Nk, "; got ", dense->sizes());
    s.dense_lead = ok4 ? -1 : dense->size(0);
  }
  return s;
}

}  // namespace attention_detail

AttentionFwdOut ragged_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const std::optional<at::Tensor>& bias_table,
                                         const std::optional<at::Tensor>& bias_index,
                                         const std::optional<at::Tensor>& dense_bias, c10::IntArrayRef sizes,
                                         c10::IntArrayRef widths, double scale, c10::IntArrayRef grid);

AttentionBwdOut ragged_attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                         const std::optional<at::Tensor>& bias_table,
                                         const std::optional<at::Tensor>& bias_index,
                                         const std::optional<at::Tensor>& dense_bias, c10::IntArrayRef sizes,
                                         c10::IntArrayRef widths, double scale, c10::IntArrayRef grid,
                                         bool need_table_grad, bool need_dense_grad, int64_t chunk);

}  // namespace resnas
