// The public op resnas::ragged_layer_norm of the C++ backends: argument checks, autograd and the no-grad forward, all
// registered in C++ (schema in registration.cpp) so that a call from Python crosses the dispatcher once.
//
//   resnas::ragged_layer_norm(Tensor x, Tensor weight, Tensor bias, int[] sizes, Tensor widths, float eps,
//                             Tensor? residual=None) -> (Tensor y, Tensor z)
//
// x is (B, ..., C_max); `sizes` are the group sizes over dim 0 (host ints: they fix shapes and grids), `widths` the
// per-group widths as an int32 (G,) tensor on x's device (device metadata). z = x + residual (an empty (0,) tensor
// without a residual). Semantics: resnas_kernels.reference.ragged_layer_norm.
//
// The pattern (torchvision's C++ ops; every op of the library follows it):
//   - the Autograd kernel (every device) checks the arguments once, then runs RaggedLayerNormFunction, a
//     torch::autograd::Function whose forward and backward call the device kernels ext_ragged_layer_norm_fwd / _bwd
//     (csrc/cpu, csrc/cuda) through the dispatcher, on 2-D rows;
//   - the CompositeExplicitAutograd kernel checks and runs the forward alone: what calls below autograd (inference
//     mode) reach;
//   - the fake kernels of the ext_* ops are registered from Python (resnas_kernels/ops/ragged_layer_norm.py), so
//     torch.compile traces through the autograd Function and records ext_* calls in its graphs.
// The Python public function only converts its arguments and picks the backend: the checks below raise ValueError /
// TypeError in Python with the messages of the Python checks (resnas_kernels/ops/_checks.py, ragged.py) that the
// reference and Triton backends run, so a caller sees the same error whatever the backend.
//
// Widths values: read and checked here only when that is free (a real CPU tensor); the CUDA kernels clamp them on the
// device instead, and fake / functional tensors (torch.compile tracing) have no values to read.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "ragged_layer_norm.h"

namespace resnas {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- Python spellings (py_dtype, py_shape: ragged.h), so that messages read exactly as the Python checks' ----
// repr() of a Python float, for the common cases: 0.0, -1.0, 1e-06.
std::string py_float(double v) {
  std::ostringstream out;
  out << v;
  std::string s = out.str();
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

// ---- The checks of the Python public function, in its order (_checks.check_float_tensor, check_vector, ...) -----
void check_float_tensor(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(is_supported_float(dtype), name,
                   " must have dtype in ['torch.float32', 'torch.float16', 'torch.bfloat16', 'torch.float64'], got ",
                   py_dtype(dtype));
  TORCH_CHECK_VALUE(t.dim() >= 2, name, " must have at least 2 dims, got shape ", py_shape(t.sizes()));
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (shape ", py_shape(t.sizes()), ", strides ",
                    py_shape(t.strides()), "); call .contiguous() first");
}

void check_same_device(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " must be on the same device as x: x is on ", x.device(), ", ",
                    name, " is on ", t.device());
}

// weight / bias: (C_max,), x's dtype or fp32, contiguous, on x's device.
void check_param(const at::Tensor& p, const char* name, const at::Tensor& x) {
  const int64_t c_max = x.size(-1);
  TORCH_CHECK_VALUE(p.dim() == 1 && p.size(0) == c_max, name, " must have shape (", c_max, ",), got ",
                    py_shape(p.sizes()));
  const bool fp32_x = x.scalar_type() == at::kFloat;
  TORCH_CHECK_TYPE(p.scalar_type() == x.scalar_type() || p.scalar_type() == at::kFloat, name, " must have dtype in [",
                   fp32_x ? "" : "'" + py_dtype(x.scalar_type()) + "', ", "'torch.float32'], got ",
                   py_dtype(p.scalar_type()));
  TORCH_CHECK_VALUE(p.is_contiguous(), name, " must be contiguous");
  check_same_device(x, p, name);
}

// True when the values of `t` can be read on the host at no cost: a real CPU tensor. Fake and functional tensors
// (torch.compile tracing) and meta tensors hold none, and reading CUDA values would sync the device.
bool values_on_host(const at::Tensor& t) {
  constexpr auto kTracing = c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize});
  return t.is_cpu() && !t.key_set().has_any(kTracing) && t.has_storage();
}

// The group metadata against x: sizes cover dim 0, widths is int32 (G,) on x's device with values in [0, C_max].
void check_groups(const at::Tensor& x, c10::IntArrayRef sizes, const at::Tensor& widths) {
  TORCH_CHECK_VALUE(!sizes.empty(), "sizes must name at least one group, got an empty sequence");
  int64_t batch = 0;
  for (size_t g = 0; g < sizes.size(); ++g) {
    TORCH_CHECK_VALUE(sizes[g] >= 0, "sizes[", g, "] must be >= 0, got ", sizes[g]);
    batch += sizes[g];
  }
  TORCH_CHECK_VALUE(batch == x.size(0), "sum of group sizes (", batch, ", sizes=", py_shape(sizes),
                    ") must equal the batch size of x (dim 0: ", x.size(0), ")");
  const auto num_groups = static_cast<int64_t>(sizes.size());
  TORCH_CHECK_TYPE(widths.scalar_type() == at::kInt, "groups.widths must be an int32 tensor (device metadata), got "
                   "dtype ", py_dtype(widths.scalar_type()));
  TORCH_CHECK_VALUE(widths.dim() == 1 && widths.size(0) == num_groups, "groups.widths must have shape (", num_groups,
                    ",) (one width per group, len(sizes)=", num_groups, "), got ", py_shape(widths.sizes()));
  check_same_device(x, widths, "groups.widths");
  if (!values_on_host(widths)) return;
  const int64_t bound = x.size(-1);
  const at::Tensor values = widths.contiguous();
  const int32_t* w = values.const_data_ptr<int32_t>();
  for (int64_t g = 0; g < num_groups; ++g) {
    TORCH_CHECK_VALUE(w[g] <= bound, "groups.widths[", g, "]=", w[g], " exceeds the maximum width ", bound,
                      " of x; groups.widths must lie in [0, ", bound, "]");
    TORCH_CHECK_VALUE(w[g] >= 0, "groups.widths[", g, "]=", w[g], " must lie in [0, ", bound, "] (the bound of x)");
  }
}

void check_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, c10::IntArrayRef sizes,
                const at::Tensor& widths, double eps, const std::optional<at::Tensor>& residual) {
  check_float_tensor(x, "x");
  check_groups(x, sizes, widths);
  if (residual.has_value() && residual->defined()) {
    const at::Tensor& r = *residual;
    check_float_tensor(r, "residual");
    check_same_device(x, r, "residual");
    TORCH_CHECK_VALUE(r.sizes() == x.sizes() && r.scalar_type() == x.scalar_type(),
                      "residual must match x in shape and dtype: x is ", py_shape(x.sizes()), " ",
                      py_dtype(x.scalar_type()), ", residual is ", py_shape(r.sizes()), " ",
                      py_dtype(r.scalar_type()));
  }
  check_param(weight, "weight", x);
  check_param(bias, "bias", x);
  TORCH_CHECK_VALUE(eps > 0, "eps must be a positive float, got ", py_float(eps));
}

// ---- The device kernels, through the dispatcher (CPU / CUDA kernels, or the fake kernels when tracing) ------------
using ExtFwdFn = LayerNormFwdOut(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                 const at::Tensor&, c10::IntArrayRef, const at::Tensor&, double);
using ExtBwdFn = LayerNormBwdOut(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                                 const at::Tensor&);

const c10::TypedOperatorHandle<ExtFwdFn>& ext_fwd() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("resnas::ext_ragged_layer_norm_fwd", "").typed<ExtFwdFn>();
  return op;
}

const c10::TypedOperatorHandle<ExtBwdFn>& ext_bwd() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("resnas::ext_ragged_layer_norm_bwd", "").typed<ExtBwdFn>();
  return op;
}

// x flattened to the kernels' 2-D rows (B * prod(middle dims), C_max), and the rows of each group.
struct Rows {
  int64_t rows = 0;
  std::vector<int64_t> row_counts;
};

Rows rows_of(const at::Tensor& x, c10::IntArrayRef sizes) {
  Rows out;
  out.rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) out.rows *= x.size(d);
  const int64_t per_sample = x.size(0) > 0 ? out.rows / x.size(0) : 0;
  out.row_counts.reserve(sizes.size());
  for (const int64_t s : sizes) out.row_counts.push_back(s * per_sample);
  return out;
}

// The forward on 2-D rows: (y, z, mean, rstd) with y and z in x's shape.
LayerNormFwdOut forward_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                             const Rows& rows, const at::Tensor& widths, double eps,
                             const std::optional<at::Tensor>& residual) {
  const int64_t c_max = x.size(-1);
  const bool has_residual = residual.has_value() && residual->defined();
  std::optional<at::Tensor> r2;
  if (has_residual) r2 = residual->view({rows.rows, c_max});
  auto [y, z, mean, rstd] =
      ext_fwd().call(x.view({rows.rows, c_max}), r2, weight, bias, rows.row_counts, widths, eps);
  return {y.view(x.sizes()), has_residual ? z.view(x.sizes()) : z, mean, rstd};
}

// Autograd: saves the normalised input (x, or z = x + residual), the statistics and the metadata; the backward is
// one ext_ragged_layer_norm_bwd call. Double backward is not supported (ext_*_bwd has no autograd formula).
class RaggedLayerNormFunction : public torch::autograd::Function<RaggedLayerNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, c10::IntArrayRef sizes, const at::Tensor& widths, double eps,
                               const std::optional<at::Tensor>& residual) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Rows rows = rows_of(x, sizes);
    const bool has_residual = residual.has_value() && residual->defined();
    auto [y, z, mean, rstd] = forward_rows(x, weight, bias, rows, widths, eps, residual);
    ctx->save_for_backward({has_residual ? z : x, weight, mean, rstd, widths});
    ctx->saved_data["row_counts"] = rows.row_counts;
    ctx->saved_data["has_residual"] = has_residual;
    if (!has_residual) ctx->mark_non_differentiable({z});  // the empty placeholder
    // Unused outputs reach the backward as undefined gradients (handled there) instead of as zero tensors that
    // autograd would allocate and fill on every call.
    ctx->set_materialize_grads(false);
    return {y, z};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& z = saved[0];  // in x's shape
    const at::Tensor &weight = saved[1], &mean = saved[2], &rstd = saved[3], &widths = saved[4];
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const int64_t c_max = z.size(-1), rows = mean.size(0);
    // An output left unused has an undefined gradient: zeros for dy (the formula needs one), nothing for dz.
    const at::Tensor dy = grads[0].defined() ? grads[0].reshape({rows, c_max}).contiguous()
                                             : at::zeros({rows, c_max}, z.options());
    std::optional<at::Tensor> dz;
    if (has_residual && grads[1].defined()) dz = grads[1].reshape({rows, c_max}).contiguous();
    auto [dx, dweight, dbias] = ext_bwd().call(dy, dz, z.view({rows, c_max}), weight, mean, rstd,
                                               ctx->saved_data["row_counts"].toIntVector(), widths);
    dx = dx.view(z.sizes());
    // Gradients of (x, weight, bias, sizes, widths, eps, residual): z = x + residual passes dx to both.
    return {dx, dweight, dbias, at::Tensor(), at::Tensor(), at::Tensor(), has_residual ? dx : at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> ragged_layer_norm_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                              const at::Tensor& bias, c10::IntArrayRef sizes,
                                                              const at::Tensor& widths, double eps,
                                                              const std::optional<at::Tensor>& residual) {
  check_args(x, weight, bias, sizes, widths, eps, residual);
  const bool has_residual = residual.has_value() && residual->defined();
  const bool needs_graph = at::GradMode::is_enabled() &&
                           (x.requires_grad() || weight.requires_grad() || bias.requires_grad() ||
                            (has_residual && residual->requires_grad()));
  if (!needs_graph) {
    // Nothing to differentiate: the forward alone, without the autograd node Function::apply would allocate.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, z, mean, rstd] = forward_rows(x, weight, bias, rows_of(x, sizes), widths, eps, residual);
    return {y, z};
  }
  const variable_list out = RaggedLayerNormFunction::apply(x, weight, bias, sizes, widths, eps, residual);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> ragged_layer_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                                             const at::Tensor& bias, c10::IntArrayRef sizes,
                                                             const at::Tensor& widths, double eps,
                                                             const std::optional<at::Tensor>& residual) {
  check_args(x, weight, bias, sizes, widths, eps, residual);
  auto [y, z, mean, rstd] = forward_rows(x, weight, bias, rows_of(x, sizes), widths, eps, residual);
  return {y, z};
}

}  // namespace
}  // namespace resnas

TORCH_LIBRARY_IMPL(resnas, Autograd, m) {
  m.impl("ragged_layer_norm", &resnas::ragged_layer_norm_autograd);
}

TORCH_LIBRARY_IMPL(resnas, CompositeExplicitAutograd, m) {
  m.impl("ragged_layer_norm", &resnas::ragged_layer_norm_forward);
}
