// Host-side group table shared by the C++ CPU / CUDA ops: the ragged contract of resnas_kernels/ragged.py on
// flattened 2-D rows. Group g owns rows [row_start[g], row_start[g+1]) and uses its first widths[g] columns.
//
// Header-only and free of pybind/Python headers, so op files that include it also build in the plain CMake library.
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace resnas {

struct GroupTable {
  std::vector<int64_t> row_start;  // size G + 1; row_start[G] == total rows
  std::vector<int64_t> widths;     // size G
  int64_t max_width = 0;           // max(widths), 0 when every group skips the op

  int64_t num_groups() const { return static_cast<int64_t>(widths.size()); }
  int64_t rows(int64_t g) const { return row_start[g + 1] - row_start[g]; }
};

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

}  // namespace resnas
