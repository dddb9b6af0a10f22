// The check macro of the C++ unit tests (each test file is its own executable, run by ctest): EXPECT(cond, fmt, ...)
// counts the check and, when it fails, prints the condition and a printf-style message and counts the failure;
// `finish()` prints the totals and is main's exit code.
#pragma once

#include <cstdio>

namespace resnas_test {

inline int g_failures = 0;
inline int g_checks = 0;

inline int finish() {
  std::printf("%d checks, %d failed\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}

}  // namespace resnas_test

#define EXPECT(cond, ...)                                                                  \
  do {                                                                                    \
    ++resnas_test::g_checks;                                                              \
    if (!(cond)) {                                                                        \
      ++resnas_test::g_failures;                                                          \
      std::fprintf(stderr, "FAILED %s:%d: %s | ", __FILE__, __LINE__, #cond);             \
      std::fprintf(stderr, __VA_ARGS__);                                                  \
      std::fprintf(stderr, "\n");                                                         \
    }                                                                                     \
  } while (0)
