// C++ unit test of the pieces every op shares (built by CMakeLists.txt, run by ctest):
//   - resnas::exp_nonpositive (ragged.h) against fp64 std::exp on a dense sample of the floats in [-80, 0]: within
//     1.05 ulp (its worst case is 1.02 ulp with FMA contraction, 0.99 without), exactly 1 at 0, exactly 0 below -80
//     and at -inf, NaN for NaN;
//   - group_of and make_group_table on empty groups; the dtype predicates and the accumulation dtype;
//   - the library defines every op schema (csrc/registration.cpp) once loaded by a plain C++ program, and the RSR
//     conv rejects an unknown route by name.
//
// No test framework (nothing to download): EXPECT records a failure and the test goes on; main() returns 1 on any.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>

#include "expect.h"
#include "ragged.h"
#include "rsr.h"

namespace {

// Error of `got` in units in the last place of the fp32 value nearest to `exact`.
double ulp_error(float got, double exact) {
  const double ulp = std::ldexp(1.0, std::ilogb(static_cast<float>(exact)) - 23);
  return std::fabs(static_cast<double>(got) - exact) / ulp;
}

void test_exp() {
  // Every 61st float bit pattern from -0 down to -80 (about 18 million values): the polynomial, the reduction and
  // the exponent assembly over every binade of the domain.
  double worst = 0.0;
  float worst_x = 0.0f;
  uint32_t bits;
  float x = -0.0f;
  std::memcpy(&bits, &x, sizeof(bits));
  for (; x >= -80.0f; bits += 61, std::memcpy(&x, &bits, sizeof(x))) {
    const double err = ulp_error(resnas::exp_nonpositive(x), std::exp(static_cast<double>(x)));
    if (err > worst) worst = err, worst_x = x;
  }
  EXPECT(worst <= 1.05, "max error %.3f ulp at x = %.9g (bound 1.05 ulp)", worst, worst_x);
  EXPECT(resnas::exp_nonpositive(0.0f) == 1.0f, "exp(0) = %.9g", resnas::exp_nonpositive(0.0f));
  EXPECT(resnas::exp_nonpositive(-80.5f) == 0.0f, "exp(-80.5) = %g (flushed to 0 below -80)",
         resnas::exp_nonpositive(-80.5f));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  EXPECT(resnas::exp_nonpositive(neg_inf) == 0.0f, "exp(-inf) = %g", resnas::exp_nonpositive(neg_inf));
  EXPECT(std::isnan(resnas::exp_nonpositive(std::numeric_limits<float>::quiet_NaN())), "exp(NaN) is not NaN");
  EXPECT(resnas::exp_nonpositive(-1.5) == std::exp(-1.5), "the fp64 overload is std::exp");
}

void test_group_table() {
  // Groups of 2, 0, 3 and 0 rows: rows 0-1 belong to group 0, rows 2-4 to group 2 (empty groups own no row).
  const resnas::GroupTable t = resnas::make_group_table({2, 0, 3, 0}, {4, 1, 0, 2}, 5, 4, "test", "x");
  EXPECT(t.num_groups() == 4 && t.max_width == 4, "num_groups %lld, max_width %lld",
         static_cast<long long>(t.num_groups()), static_cast<long long>(t.max_width));
  const int64_t expected[5] = {0, 0, 2, 2, 2};
  for (int64_t row = 0; row < 5; ++row) {
    EXPECT(resnas::group_of(t, row) == expected[row], "group_of(%lld) = %lld, expected %lld",
           static_cast<long long>(row), static_cast<long long>(resnas::group_of(t, row)),
           static_cast<long long>(expected[row]));
  }
  bool threw = false;
  try {
    resnas::make_group_table({2, 3}, {1, 5}, 5, 4, "test", "x");
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("widths[1]=5 must lie in [0, 4]") != std::string::npos;
  }
  EXPECT(threw, "a width beyond the bound is rejected by name");

  for (at::ScalarType t : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    EXPECT(resnas::is_supported_float(t), "%s is supported", resnas::py_dtype(t).c_str());
    EXPECT(resnas::acc_dtype(t) == (t == at::kDouble ? at::kDouble : at::kFloat), "acc_dtype(%s)",
           resnas::py_dtype(t).c_str());
  }
  for (at::ScalarType t : {at::kInt, at::kLong, at::kBool}) {
    EXPECT(!resnas::is_supported_float(t), "%s is not a supported float", resnas::py_dtype(t).c_str());
  }
}

void test_registration() {
  for (const char* name :
       {"ragged_layer_norm", "ext_ragged_layer_norm_fwd", "ext_ragged_layer_norm_bwd", "ragged_linear",
        "ext_ragged_linear_fwd", "ext_ragged_linear_bwd", "ragged_attention", "ext_ragged_attention_fwd",
        "ext_ragged_attention_bwd", "rsr_im2col", "rsr_conv", "rsr_epilogue", "ext_rsr_im2col_fwd",
        "ext_rsr_im2col_bwd", "ext_rsr_conv_fwd", "ext_rsr_conv_bwd", "ext_rsr_epilogue_fwd",
        "ext_rsr_epilogue_bwd"}) {
    const auto op = c10::Dispatcher::singleton().findSchema({std::string("resnas::") + name, ""});
    EXPECT(op.has_value(), "resnas::%s is defined", name);
    if (op.has_value() && std::strncmp(name, "ext_", 4) == 0) {
      EXPECT(op->hasKernelForDispatchKey(c10::DispatchKey::CPU), "resnas::%s has a CPU kernel", name);
    }
  }

  using ConvFn = at::Tensor(const at::Tensor&, const at::Tensor&, c10::IntArrayRef, const at::Tensor&,
                            const at::Tensor&, c10::IntArrayRef, int64_t, int64_t, int64_t, bool, c10::string_view);
  const auto conv = c10::Dispatcher::singleton().findSchemaOrThrow("resnas::ext_rsr_conv_fwd", "").typed<ConvFn>();
  const at::Tensor u = at::randn({1, 17, 8}), w = at::randn({12, 72});
  const at::Tensor in_w = at::full({1}, 8, at::kInt), out_w = at::full({1}, 12, at::kInt);
  const at::Tensor blocked = conv.call(u, w, {1}, in_w, out_w, {4, 4}, 3, 2, 1, true, "blocked");
  const at::Tensor automatic = conv.call(u, w, {1}, in_w, out_w, {4, 4}, 3, 2, 1, true, "auto");
  EXPECT(at::allclose(blocked, automatic, 1e-5, 1e-5), "the two conv routes agree (max diff %g)",
         (blocked - automatic).abs().max().item<double>());
  std::string message;
  try {
    conv.call(u, w, {1}, in_w, out_w, {4, 4}, 3, 2, 1, true, "fast");
  } catch (const c10::ValueError& e) {
    message = e.what();
  }
  EXPECT(message.find("ext_rsr_conv_fwd: route must be 'auto' or 'blocked', got 'fast'") != std::string::npos,
         "unknown route: got \"%s\"", message.c_str());
  // A symbol of the library, so the linker keeps it (and its registrations) even under --as-needed.
  auto* volatile keep_linked = &resnas::rsr_im2col_fwd_cpu;
  (void)keep_linked;
}

}  // namespace

int main() {
  test_exp();
  test_group_table();
  test_registration();
  return resnas_test::finish();
}
