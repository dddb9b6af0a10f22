// The public ops of the RSR pieces on the C++ backends, registered in C++ so that a call from Python crosses the
// dispatcher once (torchvision's pattern):
//
//   resnas::rsr_im2col(Tensor u, int[] sizes, Tensor widths, int[] grid, int kernel_size, int stride, int padding,
//                      bool has_cls) -> Tensor
//   resnas::rsr_conv(Tensor u, Tensor weight, int[] sizes, Tensor in_widths, Tensor out_widths, int[] grid,
//                    int kernel_size, int stride, int padding, bool has_cls, *, str route='auto') -> Tensor
//   resnas::rsr_epilogue(Tensor conv, Tensor x, Tensor pos_embed, Tensor conv_bias, Tensor? cls, Tensor? cls_bias,
//                        int[] sizes, Tensor in_widths, Tensor out_widths, int[] grid, int stride) -> Tensor
//
// (schemas in registration.cpp). Arguments and semantics are those of the device kernels resnas::ext_rsr_*_fwd
// (rsr.h): `sizes` are host ints (they fix shapes and grids), widths int32 (G,) tensors on the activations' device
// (data: a new architecture is a new tensor value). Every op has
//   - an Autograd kernel (every device): a torch::autograd::Function whose forward and backward call ext_rsr_*_fwd /
//     _bwd through the dispatcher. Those kernels check every argument, once per call, in C++;
//   - a CompositeExplicitAutograd kernel: the forward alone, what inference mode and calls below autograd reach.
// Fake kernels (of these ops and of the ext_* ops) are registered from Python
// (resnas_kernels/ops/rsr_*/registration.py), so torch.compile traces through the C++ autograd and records ext_* calls
// in its graphs. Gradients of parameters come back in the parameter's dtype (the kernels accumulate them in fp32, fp64
// for fp64). Double backward is not supported.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "rsr.h"

namespace resnas {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- the device kernels, through the dispatcher (CPU, CUDA, or the fake kernels while tracing) --------------------
at::Tensor im2col_fwd(const at::Tensor& u, c10::IntArrayRef sizes, const at::Tensor& widths, c10::IntArrayRef grid,
                      int64_t k, int64_t stride, int64_t padding, bool has_cls) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resnas::ext_rsr_im2col_fwd", "")
                       .typed<at::Tensor(const at::Tensor&, c10::IntArrayRef, const at::Tensor&, c10::IntArrayRef,
                                         int64_t, int64_t, int64_t, bool)>();
  return op.call(u, sizes, widths, grid, k, stride, padding, has_cls);
}

at::Tensor im2col_bwd(const at::Tensor& dcols, c10::IntArrayRef sizes, const at::Tensor& widths,
                      c10::IntArrayRef grid, int64_t k, int64_t stride, int64_t padding, bool has_cls) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resnas::ext_rsr_im2col_bwd", "")
                       .typed<at::Tensor(const at::Tensor&, c10::IntArrayRef, const at::Tensor&, c10::IntArrayRef,
                                         int64_t, int64_t, int64_t, bool)>();
  return op.call(dcols, sizes, widths, grid, k, stride, padding, has_cls);
}

at::Tensor conv_fwd(const at::Tensor& u, const at::Tensor& weight, c10::IntArrayRef sizes, const at::Tensor& in_w,
                    const at::Tensor& out_w, c10::IntArrayRef grid, int64_t k, int64_t stride, int64_t padding,
                    bool has_cls, c10::string_view route) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resnas::ext_rsr_conv_fwd", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::IntArrayRef, const at::Tensor&,
                                         const at::Tensor&, c10::IntArrayRef, int64_t, int64_t, int64_t, bool,
                                         c10::string_view)>();
  return op.call(u, weight, sizes, in_w, out_w, grid, k, stride, padding, has_cls, route);
}

std::tuple<at::Tensor, at::Tensor> conv_bwd(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& weight,
                                            c10::IntArrayRef sizes, const at::Tensor& in_w, const at::Tensor& out_w,
                                            c10::IntArrayRef grid, int64_t k, int64_t stride, int64_t padding,
                                            bool has_cls, c10::string_view route) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("resnas::ext_rsr_conv_bwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    c10::IntArrayRef, const at::Tensor&, const at::Tensor&,
                                                    c10::IntArrayRef, int64_t, int64_t, int64_t, bool,
                                                    c10::string_view)>();
  return op.call(dout, u, weight, sizes, in_w, out_w, grid, k, stride, padding, has_cls, route);
}

at::Tensor epilogue_fwd(const at::Tensor& conv, const at::Tensor& x, const at::Tensor& pos_embed,
                        const at::Tensor& conv_bias, const std::optional<at::Tensor>& cls,
                        const std::optional<at::Tensor>& cls_bias, c10::IntArrayRef sizes, const at::Tensor& in_w,
                        const at::Tensor& out_w, c10::IntArrayRef grid, int64_t stride) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resnas::ext_rsr_epilogue_fwd", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                         c10::IntArrayRef, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                                         int64_t)>();
  return op.call(conv, x, pos_embed, conv_bias, cls, cls_bias, sizes, in_w, out_w, grid, stride);
}

RsrEpilogueBwdOut epilogue_bwd(const at::Tensor& dout, c10::IntArrayRef sizes, const at::Tensor& in_w,
                               const at::Tensor& out_w, c10::IntArrayRef grid, int64_t stride, bool has_cls,
                               int64_t in_channels) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resnas::ext_rsr_epilogue_bwd", "")
                       .typed<RsrEpilogueBwdOut(const at::Tensor&, c10::IntArrayRef, const at::Tensor&,
                                                const at::Tensor&, c10::IntArrayRef, int64_t, bool, int64_t)>();
  return op.call(dout, sizes, in_w, out_w, grid, stride, has_cls, in_channels);
}

// ---- autograd ------------------------------------------------------------------------------------------------------
// Static metadata travels in saved_data (host ints); the widths tensors too (int32: never differentiated).
void save_geometry(AutogradContext* ctx, c10::IntArrayRef sizes, c10::IntArrayRef grid, int64_t k, int64_t stride,
                   int64_t padding, bool has_cls) {
  ctx->saved_data["sizes"] = sizes.vec();
  ctx->saved_data["grid"] = grid.vec();
  ctx->saved_data["k"] = k;
  ctx->saved_data["stride"] = stride;
  ctx->saved_data["padding"] = padding;
  ctx->saved_data["has_cls"] = has_cls;
}

class RsrIm2colFunction : public torch::autograd::Function<RsrIm2colFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& u, c10::IntArrayRef sizes,
                            const at::Tensor& widths, c10::IntArrayRef grid, int64_t k, int64_t stride,
                            int64_t padding, bool has_cls) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    save_geometry(ctx, sizes, grid, k, stride, padding, has_cls);
    ctx->saved_data["widths"] = widths;
    return im2col_fwd(u, sizes, widths, grid, k, stride, padding, has_cls);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& d = ctx->saved_data;
    const at::Tensor du = im2col_bwd(grads[0].contiguous(), d.at("sizes").toIntVector(), d.at("widths").toTensor(),
                                     d.at("grid").toIntVector(), d.at("k").toInt(), d.at("stride").toInt(),
                                     d.at("padding").toInt(), d.at("has_cls").toBool());
    return {du, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class RsrConvFunction : public torch::autograd::Function<RsrConvFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& u, const at::Tensor& weight,
                            c10::IntArrayRef sizes, const at::Tensor& in_w, const at::Tensor& out_w,
                            c10::IntArrayRef grid, int64_t k, int64_t stride, int64_t padding, bool has_cls,
                            c10::string_view route) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    save_geometry(ctx, sizes, grid, k, stride, padding, has_cls);
    ctx->saved_data["in_widths"] = in_w;
    ctx->saved_data["out_widths"] = out_w;
    ctx->saved_data["route"] = std::string(route);
    ctx->save_for_backward({u, weight});
    return conv_fwd(u, weight, sizes, in_w, out_w, grid, k, stride, padding, has_cls, route);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &u = saved[0], &weight = saved[1];
    const auto& d = ctx->saved_data;
    auto [du, dw] = conv_bwd(grads[0].contiguous(), u, weight, d.at("sizes").toIntVector(),
                             d.at("in_widths").toTensor(), d.at("out_widths").toTensor(), d.at("grid").toIntVector(),
                             d.at("k").toInt(), d.at("stride").toInt(), d.at("padding").toInt(),
                             d.at("has_cls").toBool(), d.at("route").toStringRef());
    variable_list out(11);
    out[0] = du;
    out[1] = dw.to(weight.scalar_type());
    return out;
  }
};

class RsrEpilogueFunction : public torch::autograd::Function<RsrEpilogueFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& conv, const at::Tensor& x,
                            const at::Tensor& pos_embed, const at::Tensor& conv_bias,
                            const std::optional<at::Tensor>& cls, const std::optional<at::Tensor>& cls_bias,
                            c10::IntArrayRef sizes, const at::Tensor& in_w, const at::Tensor& out_w,
                            c10::IntArrayRef grid, int64_t stride) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const bool has_cls = cls.has_value() && cls->defined();
    save_geometry(ctx, sizes, grid, stride, stride, 0, has_cls);
    ctx->saved_data["in_widths"] = in_w;
    ctx->saved_data["out_widths"] = out_w;
    ctx->saved_data["in_channels"] = x.size(-1);
    ctx->saved_data["pos_dtype"] = pos_embed.scalar_type();
    ctx->saved_data["bias_dtype"] = conv_bias.scalar_type();
    const bool has_cls_bias = cls_bias.has_value() && cls_bias->defined();
    ctx->saved_data["cls_bias_dtype"] = has_cls_bias ? cls_bias->scalar_type() : conv_bias.scalar_type();
    return epilogue_fwd(conv, x, pos_embed, conv_bias, cls, cls_bias, sizes, in_w, out_w, grid, stride);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& d = ctx->saved_data;
    const bool has_cls = d.at("has_cls").toBool();
    auto [dconv, dx, dpos, dbias, dcls, dcls_bias] =
        epilogue_bwd(grads[0].contiguous(), d.at("sizes").toIntVector(), d.at("in_widths").toTensor(),
                     d.at("out_widths").toTensor(), d.at("grid").toIntVector(), d.at("stride").toInt(), has_cls,
                     d.at("in_channels").toInt());
    variable_list out(11);
    out[0] = dconv;
    out[1] = dx;
    out[2] = dpos.to(d.at("pos_dtype").toScalarType());
    out[3] = dbias.to(d.at("bias_dtype").toScalarType());
    if (has_cls) {
      out[4] = dcls;
      out[5] = dcls_bias.to(d.at("cls_bias_dtype").toScalarType());
    }
    return out;
  }
};

// ---- kernels of the public ops -------------------------------------------------------------------------------------
at::Tensor rsr_im2col_autograd(const at::Tensor& u, c10::IntArrayRef sizes, const at::Tensor& widths,
                               c10::IntArrayRef grid, int64_t k, int64_t stride, int64_t padding, bool has_cls) {
  return RsrIm2colFunction::apply(u, sizes, widths, grid, k, stride, padding, has_cls);
}

at::Tensor rsr_conv_autograd(const at::Tensor& u, const at::Tensor& weight, c10::IntArrayRef sizes,
                             const at::Tensor& in_w, const at::Tensor& out_w, c10::IntArrayRef grid, int64_t k,
                             int64_t stride, int64_t padding, bool has_cls, c10::string_view route) {
  return RsrConvFunction::apply(u, weight, sizes, in_w, out_w, grid, k, stride, padding, has_cls, route);
}

at::Tensor rsr_epilogue_autograd(const at::Tensor& conv, const at::Tensor& x, const at::Tensor& pos_embed,
                                 const at::Tensor& conv_bias, const std::optional<at::Tensor>& cls,
                                 const std::optional<at::Tensor>& cls_bias, c10::IntArrayRef sizes,
                                 const at::Tensor& in_w, const at::Tensor& out_w, c10::IntArrayRef grid,
                                 int64_t stride) {
  return RsrEpilogueFunction::apply(conv, x, pos_embed, conv_bias, cls, cls_bias, sizes, in_w, out_w, grid, stride);
}

}  // namespace
}  // namespace resnas

TORCH_LIBRARY_IMPL(resnas, Autograd, m) {
  m.impl("rsr_im2col", &resnas::rsr_im2col_autograd);
  m.impl("rsr_conv", &resnas::rsr_conv_autograd);
  m.impl("rsr_epilogue", &resnas::rsr_epilogue_autograd);
}

TORCH_LIBRARY_IMPL(resnas, CompositeExplicitAutograd, m) {
  m.impl("rsr_im2col", &resnas::im2col_fwd);
  m.impl("rsr_conv", &resnas::conv_fwd);
  m.impl("rsr_epilogue", &resnas::epilogue_fwd);
}
