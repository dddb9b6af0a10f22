// Ragged LayerNorm (optionally fused with a residual add) on 2-D rows: shared declarations and argument checks of the
// CPU (csrc/cpu/ragged_layer_norm.cpp) and CUDA (csrc/cuda/ragged_layer_norm.cu) kernels.
//
// Schemas (defined in registration.cpp):
//   resnas::ext_ragged_layer_norm_fwd(Tensor x, Tensor? residual, Tensor weight, Tensor bias, int[] row_counts,
//                                     Tensor widths, float eps) -> (Tensor y, Tensor z, Tensor mean, Tensor rstd)
//   resnas::ext_ragged_layer_norm_bwd(Tensor dy, Tensor? dz, Tensor z, Tensor weight, Tensor mean, Tensor rstd,
//                                     int[] row_counts, Tensor widths) -> (Tensor dx, Tensor dweight, Tensor dbias)
// The public op resnas::ragged_layer_norm (csrc/ragged_layer_norm.cpp: argument checks and autograd) calls them.
// Semantics are those of `_reference_fwd` / `_reference_bwd` in resnas_kernels/ops/ragged_layer_norm.py:
//   - x: (rows, C_max); group g owns row_counts[g] consecutive rows and normalises their first widths[g] columns.
//   - row_counts are host ints (static: they fix the launch grids); widths is an int32 (G,) tensor on x's device
//     (device metadata). The CPU kernels read and check its values (free on the host); the CUDA kernels never read
//     it on the host (no sync): they load it on the device and clamp every width to [0, C_max], so no value can
//     address memory outside the tensors.
//   - z = x + residual, zero beyond the width; an empty (0,) tensor when residual is None.
//   - y zero beyond the width; mean / rstd per row in fp32 (fp64 for fp64 x), both 0 for width-0 rows.
//   - dx zero beyond the width, plus dz on the active columns; dweight / dbias summed over all rows in a fixed order
//     (deterministic), returned in weight's dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include <tuple>
#include <vector>

#include "ragged.h"

namespace resnas {

using LayerNormFwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LayerNormBwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

LayerNormFwdOut ragged_layer_norm_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                          const at::Tensor& weight, const at::Tensor& bias,
                                          c10::IntArrayRef row_counts, const at::Tensor& widths, double eps);

LayerNormBwdOut ragged_layer_norm_bwd_cpu(const at::Tensor& dy, const std::optional<at::Tensor>& dz,
                                          const at::Tensor& z, const at::Tensor& weight, const at::Tensor& mean,
                                          const at::Tensor& rstd, c10::IntArrayRef row_counts,
                                          const at::Tensor& widths);

// Rows per fixed chunk of the backward's dweight/dbias partial sums. A constant (never a function of the thread count
// or the device), so the summation order, and hence the bits of dweight/dbias, depend only on the input shape.
constexpr int64_t kLayerNormBwdChunkRows = 32;

namespace detail {

inline void check_param(const at::Tensor& p, const char* name, const at::Tensor& x, const char* x_name,
                        const char* op) {
  TORCH_CHECK(p.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(1), op, ": ", name, " must have shape (", x.size(1),
              ",) (the last dimension of ", x_name, "), got ", p.sizes());
  TORCH_CHECK(p.scalar_type() == x.scalar_type() || p.scalar_type() == at::kFloat, op, ": ", name,
              " must have dtype ", x.scalar_type(), " (like ", x_name, ") or Float, got ", p.scalar_type());
  TORCH_CHECK(p.device() == x.device(), op, ": ", name, " must be on ", x_name, "'s device ", x.device(), ", got ",
              p.device());
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& x, const char* x_name, const char* op) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have the shape of ", x_name, " ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of ", x_name, " (",
              x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x_name, "'s device ", x.device(), ", got ",
              t.device());
}

inline void check_rows_tensor(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(x.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D (rows, C_max), got shape ", x.sizes());
  TORCH_CHECK(is_supported_float(x.scalar_type()), op, ": ", name,
              " must have dtype Float, Double, Half or BFloat16, got ", x.scalar_type());
}

// Tensor checks of the ext_* ops. The metadata (row_counts, widths) is checked by the caller with the tables it
// builds: make_group_table on CPU (reads the widths), row_starts + check_widths_tensor on CUDA (does not).
inline void check_fwd_args(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                           const at::Tensor& weight, const at::Tensor& bias,
                           double eps, at::DeviceType device, const char* op) {
  check_rows_tensor(x, "x", op);
  TORCH_CHECK(x.device().type() == device, op, ": x must be a ", device, " tensor, got ", x.device());
  if (residual.has_value() && residual->defined()) check_like(*residual, "residual", x, "x", op);
  check_param(weight, "weight", x, "x", op);
  check_param(bias, "bias", x, "x", op);
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
}

inline void check_bwd_args(const at::Tensor& dy, const std::optional<at::Tensor>& dz, const at::Tensor& z,
                           const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
                           at::DeviceType device, const char* op) {
  check_rows_tensor(z, "z", op);
  TORCH_CHECK(z.device().type() == device, op, ": z must be a ", device, " tensor, got ", z.device());
  TORCH_CHECK(dy.defined(), op, ": dy must be a tensor, got None");
  check_like(dy, "dy", z, "z", op);
  if (dz.has_value() && dz->defined()) check_like(*dz, "dz", z, "z", op);
  check_param(weight, "weight", z, "z", op);
  const auto stats = acc_dtype(z.scalar_type());  // the statistics dtype
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{mean, "mean"}, {rstd, "rstd"}}) {
    TORCH_CHECK(t.defined() && t.dim() == 1 && t.size(0) == z.size(0), op, ": ", name, " must have shape (",
                z.size(0), ",) (one entry per row of z), got ", t.defined() ? t.sizes() : c10::IntArrayRef{});
    TORCH_CHECK(t.scalar_type() == stats, op, ": ", name, " must have dtype ", stats, " (the statistics dtype of ",
                z.scalar_type(), " inputs), got ", t.scalar_type());
    TORCH_CHECK(t.device() == z.device(), op, ": ", name, " must be on z's device ", z.device(), ", got ",
                t.device());
  }
}

// Row starts of the groups (size G + 1, the last one the total), checked against a tensor of `num_rows` rows: the
// host half of make_group_table, for the CUDA kernels, which read the widths on the device.
inline std::vector<int64_t> row_starts(c10::IntArrayRef row_counts, int64_t num_rows, const char* op,
                                       const char* tensor_name) {
  TORCH_CHECK_VALUE(!row_counts.empty(), op, ": row_counts must name at least one group, got an empty list");
  std::vector<int64_t> starts{0};
  starts.reserve(row_counts.size() + 1);
  for (size_t g = 0; g < row_counts.size(); ++g) {
    TORCH_CHECK_VALUE(row_counts[g] >= 0, op, ": row_counts[", g, "] must be >= 0, got ", row_counts[g]);
    starts.push_back(starts.back() + row_counts[g]);
  }
  TORCH_CHECK_VALUE(starts.back() == num_rows, op, ": sum(row_counts) (", starts.back(),
                    ") must equal the number of rows of ", tensor_name, " (", num_rows, ")");
  return starts;
}

}  // namespace detail
}  // namespace resnas
