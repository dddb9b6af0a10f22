// The pieces every C++ op shares: Python spellings for error messages, the dtype predicates and the accumulation
// dtype, the host-side group table (the ragged contract of resnas_kernels/ragged.py on flattened 2-D rows: group g
// owns rows [row_start[g], row_start[g+1]) and uses its first widths[g] columns), and the vectorisable exp of the CPU
// kernels.
//
// Header-only and free of pybind/Python headers, so op files that include it also build in the plain CMake library.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace resnas {

// Python's spelling of a dtype ("torch.float32") and of a shape ("(2, 4, 9)", "(8,)"), so that the C++ checks'
// messages read exactly as the Python checks' do.
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline std::string py_shape(c10::IntArrayRef shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// The floating dtypes every op accepts.
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The dtype kernels accumulate in, and of the statistics and parameter gradients they return: fp32 for fp32 / fp16 /
// bf16, fp64 for fp64 (at::opmath_type on CPU; resnas_kernels.reference.layer_norm.compute_dtype in Python).
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct GroupTable {
  std::vector<int64_t> row_start;  // size G + 1; row_start[G] == total rows
  std::vector<int64_t> widths;     // size G
  int64_t max_width = 0;           // max(widths), 0 when every group skips the op

  int64_t num_groups() const { return static_cast<int64_t>(widths.size()); }
  int64_t rows(int64_t g) const { return row_start[g + 1] - row_start[g]; }
};

// Group owning `row` (0 <= row < total rows): the last g with row_start[g] <= row, which skips empty groups.
inline int64_t group_of(const GroupTable& table, int64_t row) {
  auto it = std::upper_bound(table.row_start.begin(), table.row_start.end(), row);
  return static_cast<int64_t>(it - table.row_start.begin()) - 1;
}

// Validates `row_counts` / `widths` against a tensor of `num_rows` rows whose ragged dimension is `max_cols` wide and
// returns the prefix-summed table. `op` and the argument names appear in every error message.
inline GroupTable make_group_table(c10::IntArrayRef row_counts, c10::IntArrayRef widths, int64_t num_rows,
                                   int64_t max_cols, const char* op, const char* tensor_name) {
  TORCH_CHECK(!row_counts.empty(), op, ": row_counts must name at least one group, got an empty list");
  TORCH_CHECK(row_counts.size() == widths.size(), op, ": widths must have one entry per group: len(row_counts)=",
              row_counts.size(), ", len(widths)=", widths.size());
  GroupTable table;
  table.row_start.reserve(row_counts.size() + 1);
  table.widths.reserve(widths.size());
  table.row_start.push_back(0);
  for (size_t g = 0; g < row_counts.size(); ++g) {
    TORCH_CHECK(row_counts[g] >= 0, op, ": row_counts[", g, "] must be >= 0, got ", row_counts[g]);
    TORCH_CHECK(widths[g] >= 0 && widths[g] <= max_cols, op, ": widths[", g, "]=", widths[g], " must lie in [0, ",
                max_cols, "] (the last dimension of ", tensor_name, ")");
    table.row_start.push_back(table.row_start.back() + row_counts[g]);
    table.widths.push_back(widths[g]);
    if (widths[g] > table.max_width) table.max_width = widths[g];
  }
  TORCH_CHECK(table.row_start.back() == num_rows, op, ": sum(row_counts) (", table.row_start.back(),
              ") must equal the number of rows of ", tensor_name, " (", num_rows, ")");
  return table;
}

// Shape, dtype and device checks of a widths tensor (device metadata, resnas_kernels/ragged.py): int32, (G,), on the
// device of `like`. Values are not read: CUDA ops clamp them on the device, CPU ops read them in make_group_table.
inline void check_widths_tensor(const at::Tensor& widths, int64_t num_groups, const at::Tensor& like, const char* op,
                                const char* widths_name, const char* tensor_name) {
  TORCH_CHECK_TYPE(widths.scalar_type() == at::kInt, op, ": ", widths_name,
                   " must be an int32 tensor (device metadata), got ", widths.scalar_type());
  TORCH_CHECK_VALUE(widths.dim() == 1 && widths.size(0) == num_groups, op, ": ", widths_name, " must have shape (",
                    num_groups, ",) (one width per group), got ", widths.sizes());
  TORCH_CHECK_VALUE(widths.device() == like.device(), op, ": ", widths_name, " must be on the same device as ",
                    tensor_name, ": ", tensor_name, " is on ", like.device(), ", ", widths_name, " is on ",
                    widths.device());
}

// make_group_table for a CPU widths tensor: reads the values (no sync on the host) and checks them like host lists.
inline GroupTable make_group_table(c10::IntArrayRef row_counts, const at::Tensor& widths, int64_t num_rows,
                                   int64_t max_cols, const char* op, const char* tensor_name,
                                   const char* widths_name = "widths") {
  TORCH_CHECK_VALUE(widths.scalar_type() == at::kInt && widths.dim() == 1, op, ": ", widths_name,
                    " must be a 1-D int32 tensor (device metadata), got ", widths.scalar_type(), " of shape ",
                    widths.sizes());
  TORCH_CHECK_VALUE(widths.device().is_cpu(), op, ": ", widths_name, " must be a CPU tensor here, got ",
                    widths.device());
  TORCH_CHECK_VALUE(static_cast<size_t>(widths.size(0)) == row_counts.size(), op, ": ", widths_name,
                    " must have one entry per group: ", row_counts.size(), " groups, ", widths_name, " has shape ",
                    widths.sizes());
  const at::Tensor contiguous = widths.contiguous();
  const int32_t* w = contiguous.data_ptr<int32_t>();
  std::vector<int64_t> values(w, w + contiguous.numel());
  for (size_t g = 0; g < values.size(); ++g) {
    TORCH_CHECK_VALUE(values[g] >= 0 && values[g] <= max_cols, op, ": ", widths_name, "[", g, "]=", values[g],
                      " must lie in [0, ", max_cols, "] (the bound of ", tensor_name, ")");
  }
  return make_group_table(row_counts, c10::IntArrayRef(values), num_rows, max_cols, op, tensor_name);
}

// exp(x) for x <= ~0 (a score minus its row max or log-sum-exp, the exponent of a Gaussian or an erfc tail), written
// so that the compiler vectorises it inside `omp simd` loops: libm's expf does not vectorise without -ffast-math.
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2 (ln2 split so that n * hi is exact), e^r by the Cephes expf
// polynomial, 2^n built from its exponent bits; round to nearest by the 1.5 * 2^23 trick, which holds because the
// build never uses -ffast-math. Largest error on [-80, 0], every float checked against fp64 exp: 1.02 ulp where GCC
// contracts to FMA (the default -march=native builds), 0.99 ulp without FMA; a degree-7 Taylor polynomial on the same
// reduction gets 0.94 and 1.21, a worse worst case. Below -80 it returns exactly 0 instead of a tiny or denormal
// value: denormal arithmetic is ~100x slower on x86, and callers only add such values to O(1) terms (e^-80 ~ 1.8e-35).
inline float exp_nonpositive(float x) {
  const bool underflow = x < -80.0f;
  x = underflow ? -80.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? 0.0f : y * scale;
}

// fp64 inputs check the kernels against the reference (gradcheck), they are not the fast path: libm's exp.
inline double exp_nonpositive(double x) { return std::exp(x); }

}  // namespace resnas
