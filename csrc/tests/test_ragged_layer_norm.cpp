// C++ unit test of resnas::ext_ragged_layer_norm_fwd / _bwd (built by CMakeLists.txt, run by ctest).
//
// Checks, on fresh random inputs for fp64 / fp32 / bf16 / fp16, with and without residual / dz, fp32 and same-dtype
// parameters, on awkward shapes (group rows 17, 65, 257; widths 176, 220, 0, 1, C_max; one-row and empty groups; more
// groups than one CUDA launch takes; C_max = 0; zero rows):
//   - forward against at::native_layer_norm applied per group on the active columns (fp64), zeros beyond;
//   - forward and backward against a plain loop reference in fp64 written below (the op's spec, line by line);
//   - backward against at::native_layer_norm_backward per group (fp64), dweight/dbias summed over the groups;
//   - bitwise equal dx / dweight / dbias for 1, 2 and 3 threads (the fixed-chunk summation order);
//   - the op reached through the dispatcher equals the directly called CPU function;
//   - bad arguments raise c10::Error naming the argument.
// When CUDA is available and the library was built with its CUDA kernels, the same checks run on the GPU too.
//
// No test framework (nothing to download): EXPECT records a failure and the test goes on; main() returns 1 on any.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "expect.h"
#include "ragged_layer_norm.h"

namespace {

using FwdFn = resnas::LayerNormFwdOut(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                      const at::Tensor&, c10::IntArrayRef, const at::Tensor&, double);
using BwdFn = resnas::LayerNormBwdOut(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                                      const at::Tensor&);

// The int32 widths tensor the ops take (device metadata), on `device`.
at::Tensor widths_tensor(const std::vector<int64_t>& widths, at::Device device = at::kCPU) {
  return at::tensor(widths, at::kLong).to(at::kInt).to(device);
}

c10::TypedOperatorHandle<FwdFn> fwd_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("resnas::ext_ragged_layer_norm_fwd", "").typed<FwdFn>();
}
c10::TypedOperatorHandle<BwdFn> bwd_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("resnas::ext_ragged_layer_norm_bwd", "").typed<BwdFn>();
}

// Tolerances, as |got - want| <= atol + rtol * |want| against fp64 references computed from the same (rounded) inputs:
// - fp64: the kernel and the reference do the same fp64 math in another summation order: 1e-10 is ~1e5 ulps of slack
//   for rows of <= 256 elements and dweight sums over <= 340 rows.
// - fp32: fp32 accumulation over <= 256 columns (relative error ~ 256 * 6e-8 ~ 1.5e-5 worst case, far less in
//   practice) and dweight sums of <= 340 rows of magnitude ~3: 1e-4.
// - bf16 / fp16 outputs: one rounding of the fp32 result to 8 / 11 significant bits dominates: 2^-8 ~ 3.9e-3 and
//   2^-11 ~ 4.9e-4 relative, doubled for values that round from near a binade edge, plus the fp32 error above.
//   Statistics (mean / rstd) are fp32 for every input dtype, so they always get the fp32 tolerance.
struct Tol {
  double atol, rtol;
};
Tol tol_for(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return {1e-10, 1e-10};
    case at::kFloat: return {1e-4, 1e-4};
    case at::kBFloat16: return {1e-2, 1e-2};
    case at::kHalf: return {2e-3, 2e-3};
    default: return {0, 0};
  }
}

bool close(const at::Tensor& got, const at::Tensor& want, Tol tol, double* worst) {
  if (got.sizes() != want.sizes()) return false;
  if (got.numel() == 0) return true;
  const at::Tensor g = got.to(at::kCPU).to(at::kDouble), w = want.to(at::kCPU).to(at::kDouble);
  const at::Tensor excess = (g - w).abs() - (tol.atol + tol.rtol * w.abs());
  *worst = (g - w).abs().max().item<double>();
  return excess.max().item<double>() <= 0 && !g.isnan().any().item<bool>();
}

#define EXPECT_CLOSE(got, want, tol, what)                                                                   \
  do {                                                                                                      \
    double worst_ = 0;                                                                                      \
    EXPECT(close(got, want, tol, &worst_), "%s: max |diff| %.3g (atol %.1g, rtol %.1g)", (what).c_str(),     \
          worst_, (tol).atol, (tol).rtol);                                                                  \
  } while (0)

struct Case {
  std::string name;
  std::vector<int64_t> row_counts, widths;
  int64_t C;
};

// Row widths (one per row) of a case.
std::vector<int64_t> row_widths(const Case& c) {
  std::vector<int64_t> out;
  for (size_t g = 0; g < c.row_counts.size(); ++g) out.insert(out.end(), c.row_counts[g], c.widths[g]);
  return out;
}

int64_t total_rows(const Case& c) {
  int64_t n = 0;
  for (int64_t r : c.row_counts) n += r;
  return n;
}

// Plain fp64 loop reference of the op's spec (resnas_kernels/ops/ragged_layer_norm.py: _reference_fwd/_reference_bwd).
struct RefFwd {
  at::Tensor y, z, mean, rstd;
};
RefFwd loop_reference_fwd(const Case& c, const at::Tensor& x, const at::Tensor* r, const at::Tensor& w,
                          const at::Tensor& b, double eps) {
  const int64_t rows = x.size(0), C = x.size(1);
  const at::Tensor xd = x.to(at::kDouble).contiguous(), wd = w.to(at::kDouble), bd = b.to(at::kDouble);
  // The fused residual z = x + r is stored in x's dtype and the statistics are taken of z as stored (the
  // contract of every backend), so the reference rounds the exact sum once to that dtype before normalising.
  const at::Tensor zd = r != nullptr ? (xd + r->to(at::kDouble)).to(x.scalar_type()).to(at::kDouble).contiguous()
                                     : xd.clone();
  RefFwd out{at::zeros({rows, C}, at::kDouble), zd, at::zeros({rows}, at::kDouble), at::zeros({rows}, at::kDouble)};
  auto Y = out.y.accessor<double, 2>(), Z = out.z.accessor<double, 2>();
  auto W = wd.accessor<double, 1>(), B = bd.accessor<double, 1>();
  auto M = out.mean.accessor<double, 1>(), S = out.rstd.accessor<double, 1>();
  const std::vector<int64_t> widths = row_widths(c);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t n = widths[i];
    if (n == 0) continue;
    double sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += Z[i][j];
    const double mean = sum / n;
    double sq = 0;
    for (int64_t j = 0; j < n; ++j) sq += (Z[i][j] - mean) * (Z[i][j] - mean);
    const double rstd = 1.0 / std::sqrt(sq / n + eps);
    for (int64_t j = 0; j < n; ++j) Y[i][j] = (Z[i][j] - mean) * rstd * W[j] + B[j];
    M[i] = mean;
    S[i] = rstd;
  }
  return out;
}

struct RefBwd {
  at::Tensor dx, dw, db;
};
RefBwd loop_reference_bwd(const Case& c, const at::Tensor& dy, const at::Tensor* dz, const at::Tensor& z,
                          const at::Tensor& w, const at::Tensor& mean, const at::Tensor& rstd) {
  const int64_t rows = z.size(0), C = z.size(1);
  const at::Tensor dyd = dy.to(at::kDouble).contiguous(), zd = z.to(at::kDouble).contiguous();
  const at::Tensor dzd = dz != nullptr ? dz->to(at::kDouble).contiguous() : at::zeros_like(zd);
  const at::Tensor wd = w.to(at::kDouble), md = mean.to(at::kDouble), sd = rstd.to(at::kDouble);
  RefBwd out{at::zeros({rows, C}, at::kDouble), at::zeros({C}, at::kDouble), at::zeros({C}, at::kDouble)};
  auto G = dyd.accessor<double, 2>(), Zt = zd.accessor<double, 2>(), DZ = dzd.accessor<double, 2>(),
       DX = out.dx.accessor<double, 2>();
  auto W = wd.accessor<double, 1>(), M = md.accessor<double, 1>(), S = sd.accessor<double, 1>();
  auto DW = out.dw.accessor<double, 1>(), DB = out.db.accessor<double, 1>();
  const std::vector<int64_t> widths = row_widths(c);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t n = widths[i];
    if (n == 0) continue;
    double c1 = 0, c2 = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double xhat = (Zt[i][j] - M[i]) * S[i];
      c1 += xhat * W[j] * G[i][j];
      c2 += W[j] * G[i][j];
    }
    c1 /= n;
    c2 /= n;
    for (int64_t j = 0; j < n; ++j) {
      const double xhat = (Zt[i][j] - M[i]) * S[i];
      DX[i][j] = (W[j] * G[i][j] - (xhat * c1 + c2)) * S[i] + DZ[i][j];
      DW[j] += G[i][j] * xhat;
      DB[j] += G[i][j];
    }
  }
  return out;
}

// Per-group ATen LayerNorm (fp64) on the active columns, zero-padded: the forward's spec in terms of at::layer_norm.
RefFwd aten_reference_fwd(const Case& c, const at::Tensor& z64, const at::Tensor& w, const at::Tensor& b, double eps) {
  const int64_t C = z64.size(1);
  RefFwd out{at::zeros_like(z64), at::Tensor(), at::zeros({z64.size(0)}, at::kDouble),
             at::zeros({z64.size(0)}, at::kDouble)};
  int64_t start = 0;
  for (size_t g = 0; g < c.row_counts.size(); ++g) {
    const int64_t n = c.row_counts[g], width = c.widths[g];
    if (n > 0 && width > 0) {
      const at::Tensor part = z64.slice(0, start, start + n).slice(1, 0, width);
      auto [y, mean, rstd] = at::native_layer_norm(part, {width}, w.slice(0, 0, width).to(at::kDouble),
                                                   b.slice(0, 0, width).to(at::kDouble), eps);
      out.y.slice(0, start, start + n).slice(1, 0, width).copy_(y);
      out.mean.slice(0, start, start + n).copy_(mean.reshape({n}));
      out.rstd.slice(0, start, start + n).copy_(rstd.reshape({n}));
    }
    start += n;
  }
  (void)C;
  return out;
}

// Per-group ATen LayerNorm backward (fp64), using the statistics the kernel saved.
RefBwd aten_reference_bwd(const Case& c, const at::Tensor& dy, const at::Tensor* dz, const at::Tensor& z,
                          const at::Tensor& w, const at::Tensor& mean, const at::Tensor& rstd) {
  const int64_t C = z.size(1);
  const at::Tensor dyd = dy.to(at::kDouble), zd = z.to(at::kDouble), wd = w.to(at::kDouble);
  const at::Tensor md = mean.to(at::kDouble), sd = rstd.to(at::kDouble);
  RefBwd out{at::zeros_like(zd), at::zeros({C}, at::kDouble), at::zeros({C}, at::kDouble)};
  int64_t start = 0;
  for (size_t g = 0; g < c.row_counts.size(); ++g) {
    const int64_t n = c.row_counts[g], width = c.widths[g];
    if (n > 0 && width > 0) {
      auto rows = [&](const at::Tensor& t) { return t.slice(0, start, start + n); };
      auto [dx, dw, db] = at::native_layer_norm_backward(
          rows(dyd).slice(1, 0, width), rows(zd).slice(1, 0, width), {width}, rows(md).reshape({n, 1}),
          rows(sd).reshape({n, 1}), wd.slice(0, 0, width), at::zeros({width}, at::kDouble), {true, true, true});
      rows(out.dx).slice(1, 0, width).copy_(dx);
      out.dw.slice(0, 0, width).add_(dw);
      out.db.slice(0, 0, width).add_(db);
    }
    start += n;
  }
  if (dz != nullptr) {
    const at::Tensor active =
        at::arange(C).unsqueeze(0) < at::tensor(row_widths(c), at::kLong).unsqueeze(1);
    out.dx.add_(dz->to(at::kDouble) * active);
  }
  return out;
}

// Inputs that follow the ragged contract (zero beyond each row's width), with some offset so the mean matters.
at::Tensor ragged_randn(const Case& c, at::ScalarType dtype, const at::TensorOptions& dev) {
  const int64_t rows = total_rows(c);
  const at::Tensor active =
      (at::arange(c.C).unsqueeze(0) < at::tensor(row_widths(c), at::kLong).unsqueeze(1)).to(at::kDouble);
  const at::Tensor x = (at::randn({rows, c.C}, at::kDouble) * 1.5 + 0.7) * active;
  return x.to(dtype).to(dev.device());
}

void run_case(const Case& c, at::ScalarType dtype, bool fp32_params, bool with_residual, const at::Device& device) {
  const std::string tag = c.name + " dtype=" + std::string(c10::toString(dtype)) +
                          (fp32_params ? " params=fp32" : " params=x") + (with_residual ? " +residual" : "") +
                          " " + device.str();
  const at::TensorOptions dev = at::TensorOptions().device(device);
  const double eps = 1e-5;
  const int64_t rows = total_rows(c);
  const at::ScalarType pdtype = fp32_params ? at::kFloat : dtype;
  const at::Tensor x = ragged_randn(c, dtype, dev);
  const at::Tensor r = ragged_randn(c, dtype, dev);
  const at::Tensor w = at::randn({c.C}, at::kDouble).to(pdtype).to(device);
  const at::Tensor b = at::randn({c.C}, at::kDouble).to(pdtype).to(device);
  const std::optional<at::Tensor> res = with_residual ? std::optional<at::Tensor>(r) : std::nullopt;
  const at::Tensor widths = widths_tensor(c.widths, device);  // device metadata, as the Python layer passes it

  auto [y, z, mean, rstd] = fwd_op().call(x, res, w, b, c.row_counts, widths, eps);
  const at::ScalarType stats = dtype == at::kDouble ? at::kDouble : at::kFloat;
  EXPECT(y.scalar_type() == dtype && y.sizes() == x.sizes(), "%s: y is %s", tag.c_str(), toString(y.scalar_type()));
  EXPECT(mean.scalar_type() == stats && rstd.scalar_type() == stats && mean.numel() == rows && rstd.numel() == rows,
        "%s: mean/rstd dtype or size", tag.c_str());
  EXPECT(with_residual ? z.sizes() == x.sizes() : (z.dim() == 1 && z.numel() == 0), "%s: z shape", tag.c_str());

  const Tol tol = tol_for(dtype), stat_tol = tol_for(stats);
  const RefFwd ref = loop_reference_fwd(c, x.cpu(), with_residual ? &r : nullptr, w.cpu(), b.cpu(), eps);
  EXPECT_CLOSE(y, ref.y, tol, tag + " y vs loop reference");
  EXPECT_CLOSE(mean, ref.mean, stat_tol, tag + " mean vs loop reference");
  EXPECT_CLOSE(rstd, ref.rstd, stat_tol, tag + " rstd vs loop reference");
  if (with_residual) {
    // Both sides round the exact x + r once to the dtype, so they agree to the dtype's tolerance.
    EXPECT_CLOSE(z, ref.z, tol, tag + " z vs loop reference");
  }
  const RefFwd aten = aten_reference_fwd(c, ref.z, w.cpu(), b.cpu(), eps);
  EXPECT_CLOSE(y, aten.y, tol, tag + " y vs per-group at::native_layer_norm");
  EXPECT_CLOSE(mean, aten.mean, stat_tol, tag + " mean vs per-group at::native_layer_norm");
  EXPECT_CLOSE(rstd, aten.rstd, stat_tol, tag + " rstd vs per-group at::native_layer_norm");

  // Exactly zero beyond the width (not merely close), in y and z.
  const at::Tensor inactive =
      (at::arange(c.C).unsqueeze(0) >= at::tensor(row_widths(c), at::kLong).unsqueeze(1)).to(device);
  EXPECT(y.masked_select(inactive).count_nonzero().item<int64_t>() == 0, "%s: y nonzero beyond width", tag.c_str());
  if (with_residual)
    EXPECT(z.masked_select(inactive).count_nonzero().item<int64_t>() == 0, "%s: z nonzero beyond width", tag.c_str());

  // Backward on the saved tensors; dy is dense (garbage beyond the width must be ignored).
  const at::Tensor z_saved = with_residual ? z : x;
  const at::Tensor dy = at::randn({rows, c.C}, at::kDouble).to(dtype).to(device);
  const at::Tensor dz = at::randn({rows, c.C}, at::kDouble).to(dtype).to(device);
  const std::optional<at::Tensor> dz_opt = with_residual ? std::optional<at::Tensor>(dz) : std::nullopt;
  auto [dx, dw, db] = bwd_op().call(dy, dz_opt, z_saved, w, mean, rstd, c.row_counts, widths);
  EXPECT(dx.scalar_type() == dtype && dx.sizes() == x.sizes(), "%s: dx dtype/shape", tag.c_str());
  EXPECT(dw.scalar_type() == pdtype && db.scalar_type() == pdtype && dw.numel() == c.C && db.numel() == c.C,
        "%s: dweight/dbias dtype/shape", tag.c_str());
  const at::Tensor dz_cpu = dz.cpu();
  const RefBwd lref = loop_reference_bwd(c, dy.cpu(), with_residual ? &dz_cpu : nullptr, z_saved.cpu(), w.cpu(),
                                         mean.cpu(), rstd.cpu());
  const Tol ptol = tol_for(pdtype);
  EXPECT_CLOSE(dx, lref.dx, tol, tag + " dx vs loop reference");
  EXPECT_CLOSE(dw, lref.dw, ptol, tag + " dweight vs loop reference");
  EXPECT_CLOSE(db, lref.db, ptol, tag + " dbias vs loop reference");
  const RefBwd aref = aten_reference_bwd(c, dy.cpu(), with_residual ? &dz_cpu : nullptr, z_saved.cpu(), w.cpu(),
                                         mean.cpu(), rstd.cpu());
  EXPECT_CLOSE(dx, aref.dx, tol, tag + " dx vs per-group at::native_layer_norm_backward");
  EXPECT_CLOSE(dw, aref.dw, ptol, tag + " dweight vs per-group at::native_layer_norm_backward");
  EXPECT_CLOSE(db, aref.db, ptol, tag + " dbias vs per-group at::native_layer_norm_backward");
  EXPECT(dx.masked_select(inactive).count_nonzero().item<int64_t>() == 0, "%s: dx nonzero beyond width", tag.c_str());

  // Same bits on a second call (and, on CPU, whatever the number of threads).
  const int saved_threads = at::get_num_threads();
  for (int threads : {1, 2, 3}) {
    if (device.is_cpu()) at::set_num_threads(threads);
    auto [y2, z2, mean2, rstd2] = fwd_op().call(x, res, w, b, c.row_counts, widths, eps);
    auto [dx2, dw2, db2] = bwd_op().call(dy, dz_opt, z_saved, w, mean, rstd, c.row_counts, widths);
    EXPECT(at::equal(y, y2) && at::equal(mean, mean2) && at::equal(rstd, rstd2) && at::equal(z, z2),
          "%s: forward not bitwise reproducible with %d threads", tag.c_str(), threads);
    EXPECT(at::equal(dx, dx2) && at::equal(dw, dw2) && at::equal(db, db2),
          "%s: backward not bitwise reproducible with %d threads", tag.c_str(), threads);
    if (!device.is_cpu()) break;
  }
  at::set_num_threads(saved_threads);

  if (device.is_cpu()) {  // the dispatcher routes to exactly this function
    auto direct = resnas::ragged_layer_norm_fwd_cpu(x, res, w, b, c.row_counts, widths, eps);
    EXPECT(at::equal(std::get<0>(direct), y), "%s: dispatcher and direct call differ", tag.c_str());
  }
}

// `fn` must throw a c10::Error whose message contains `needle`.
void expect_error(const std::string& what, const std::string& needle, const std::function<void()>& fn) {
  try {
    fn();
    EXPECT(false, "%s: no error raised (expected one mentioning '%s')", what.c_str(), needle.c_str());
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT(msg.find(needle) != std::string::npos, "%s: error '%s' does not mention '%s'", what.c_str(), msg.c_str(),
          needle.c_str());
  }
}

void run_error_checks() {
  const at::Tensor x = at::randn({6, 8});
  const at::Tensor w = at::randn({8}), b = at::randn({8});
  const std::vector<int64_t> rc{2, 4};
  const at::Tensor wd = widths_tensor({8, 3});
  expect_error("width beyond C_max", "widths[1]=9",
               [&] { fwd_op().call(x, std::nullopt, w, b, rc, widths_tensor({8, 9}), 1e-5); });
  expect_error("negative width", "widths[0]",
               [&] { fwd_op().call(x, std::nullopt, w, b, rc, widths_tensor({-1, 3}), 1e-5); });
  expect_error("row sum", "sum(row_counts)",
               [&] { fwd_op().call(x, std::nullopt, w, b, std::vector<int64_t>{2, 3}, wd, 1e-5); });
  expect_error("negative rows", "row_counts[0]",
               [&] { fwd_op().call(x, std::nullopt, w, b, std::vector<int64_t>{-2, 8}, wd, 1e-5); });
  expect_error("group count", "one entry per group",
               [&] { fwd_op().call(x, std::nullopt, w, b, rc, widths_tensor({8}), 1e-5); });
  expect_error("no groups", "at least one group",
               [&] { fwd_op().call(x.slice(0, 0, 0), std::nullopt, w, b, {}, widths_tensor({}), 1e-5); });
  expect_error("weight shape", "weight must have shape (8,)",
               [&] { fwd_op().call(x, std::nullopt, at::randn({7}), b, rc, wd, 1e-5); });
  expect_error("bias dtype", "bias must have dtype",
               [&] { fwd_op().call(x, std::nullopt, w, b.to(at::kDouble), rc, wd, 1e-5); });
  expect_error("x rank", "x must be 2-D", [&] { fwd_op().call(x.reshape({2, 3, 8}), std::nullopt, w, b, rc, wd, 1e-5); });
  expect_error("x dtype", "x must have dtype",
               [&] { fwd_op().call(x.to(at::kInt), std::nullopt, w.to(at::kInt), b.to(at::kInt), rc, wd, 1e-5); });
  expect_error("residual shape", "residual must have the shape of x",
               [&] { fwd_op().call(x, at::randn({6, 7}), w, b, rc, wd, 1e-5); });
  expect_error("residual dtype", "residual must have the dtype of x",
               [&] { fwd_op().call(x, x.to(at::kDouble), w, b, rc, wd, 1e-5); });
  expect_error("eps", "eps must be > 0", [&] { fwd_op().call(x, std::nullopt, w, b, rc, wd, 0.0); });
  auto [y, z, mean, rstd] = fwd_op().call(x, std::nullopt, w, b, rc, wd, 1e-5);
  expect_error("dy shape", "dy must have the shape of z",
               [&] { bwd_op().call(at::randn({6, 7}), std::nullopt, x, w, mean, rstd, rc, wd); });
  expect_error("dz dtype", "dz must have the dtype of z",
               [&] { bwd_op().call(x, x.to(at::kDouble), x, w, mean, rstd, rc, wd); });
  expect_error("mean size", "mean must have shape (6,)",
               [&] { bwd_op().call(x, std::nullopt, x, w, mean.slice(0, 0, 5), rstd, rc, wd); });
  expect_error("rstd dtype", "rstd must have dtype",
               [&] { bwd_op().call(x, std::nullopt, x, w, mean, rstd.to(at::kDouble), rc, wd); });
  expect_error("widths dtype", "widths must be a 1-D int32 tensor",
               [&] { fwd_op().call(x, std::nullopt, w, b, rc, wd.to(at::kLong), 1e-5); });
  expect_error("bwd widths", "widths[0]=9",
               [&] { bwd_op().call(x, std::nullopt, x, w, mean, rstd, rc, widths_tensor({9, 1})); });
}

std::vector<Case> cases() {
  std::vector<Case> out = {
      {"rows 17/65/257 widths 176/220/0", {17, 65, 257}, {176, 220, 0}, 256},
      {"one-row and empty groups", {1, 0, 1, 3, 0, 2}, {220, 256, 1, 176, 0, 256}, 256},
      {"odd C_max 229", {5, 1, 9}, {229, 0, 33}, 229},
      {"all widths 0", {0, 5}, {0, 0}, 16},
      {"C_max 0", {3}, {0}, 0},
      {"no rows", {0, 0}, {4, 8}, 8},
  };
  Case many{"40 groups (over one CUDA launch)", {}, {}, 96};
  for (int g = 0; g < 40; ++g) {
    many.row_counts.push_back(g % 4);           // includes empty groups
    many.widths.push_back((g * 37) % 97);       // 0 .. 96, varied
  }
  out.push_back(many);
  Case wide{"C_max 1100 (wide-row kernels on CUDA)", {3, 4}, {1100, 517}, 1100};
  out.push_back(wide);
  return out;
}

}  // namespace

int main() {
  at::manual_seed(0);
  std::vector<at::Device> devices{at::Device(at::kCPU)};
  const bool cuda_kernel = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("resnas::ext_ragged_layer_norm_fwd", "")
                               .hasKernelForDispatchKey(c10::DispatchKey::CUDA);
  if (cuda_kernel && at::hasCUDA()) devices.emplace_back(at::kCUDA, 0);
  std::printf("devices: CPU%s; threads: %d\n", devices.size() > 1 ? " + CUDA" : "", at::get_num_threads());
  for (const at::Device& device : devices) {
    for (const Case& c : cases()) {
      for (at::ScalarType dtype : {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf}) {
        for (bool fp32_params : {false, true}) {
          if (fp32_params && dtype == at::kFloat) continue;  // same as params=x
          for (bool with_residual : {false, true}) run_case(c, dtype, fp32_params, with_residual, device);
        }
      }
    }
  }
  run_error_checks();
  return resnas_test::finish();
}
