// The Python module resnas_kernels._C. It holds no op code: importing it loads the shared object, whose static
// initialisers (the schemas of csrc/registration.cpp, the TORCH_LIBRARY_IMPL blocks of the op files) register the ops
// under torch.ops.resnas. The op sources never include Python headers, so the CMake build
// (CMakeLists.txt) compiles them into a plain libtorch library without this file.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resnas-kernels C++/CUDA ops; they are registered under torch.ops.resnas on import";
#ifdef RESNAS_WITH_CUDA
  m.attr("WITH_CUDA") = true;  // resnas_kernels/_ext.py reads it to decide whether the cuda backend exists
#else
  m.attr("WITH_CUDA") = false;
#endif
}
