"""Build script: declares the packages and the C++/CUDA extension `resnas_kernels._C`.

Environment knobs (all optional):
  RESNAS_BUILD_EXT=0      skip the extension; the package then runs on the reference and Triton paths.
  RESNAS_FORCE_CUDA=1     compile the CUDA sources even if torch or nvcc look CUDA-less (needs nvcc).
  RESNAS_BUILD_CUDA=0     never compile the CUDA sources.
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0", as on a GPU-less build host nothing can be probed).
  RESNAS_CPU_NATIVE=0     do not add -march=native to the C++ CPU flags (set it when building a wheel for other machines).
  RESNAS_DEBUG=1          -O0 -g instead of -O3.
  RESNAS_BUILD_DIR=DIR    keep the object files and build.ninja in DIR (relative to this file), so the next build
                          recompiles only the changed sources; unset: a fresh temporary directory every build.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str, default: str = "") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


def _packages():
    """resnas_kernels plus models/, search/ and bench/ installed as its subpackages (never as top-level names)."""
    mapping = {"resnas_kernels": "resnas_kernels", "resnas_kernels.models": "models",
               "resnas_kernels.search": "search", "resnas_kernels.bench": "bench"}
    packages = []
    for pkg, folder in mapping.items():
        packages.append(pkg)
        packages += [f"{pkg}.{sub}" for sub in find_packages(folder)]
    return packages, mapping


def _locate_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; when nvcc sits outside its toolkit (e.g. /usr/local/bin/nvcc)
    that guess lacks lib64/libcudart. Point CUDA_HOME at a real toolkit before torch's cpp_extension reads it."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and glob.glob(os.path.join(home, "lib*", "libcudart.so*")):
            os.environ["CUDA_HOME"] = home
            return


def _extensions():
    if os.environ.get("RESNAS_BUILD_EXT", "1").strip() == "0":
        print("resnas-kernels: RESNAS_BUILD_EXT=0, building no extension")
        return [], {}
    _locate_cuda_home()
    import torch
    from torch.utils import cpp_extension

    debug = _flag("RESNAS_DEBUG")
    native = os.environ.get("RESNAS_CPU_NATIVE", "1").strip() != "0"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++17 for older torch, C++20 for
    # newer torch, whose headers #error under C++17), and nvcc rejects a second -std.
    cxx += ["-fopenmp"] + (["-march=native"] if native else [])
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))

    has_nvcc = cpp_extension.CUDA_HOME is not None and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    build_cuda = (torch.version.cuda is not None and has_nvcc) or _flag("RESNAS_FORCE_CUDA")
    if os.environ.get("RESNAS_BUILD_CUDA", "1").strip() == "0":
        build_cuda = False
    # Headers as depends: a plain `setup.py build_ext` then rebuilds when only a header changed.
    headers = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))
    kwargs = dict(extra_link_args=["-fopenmp"], define_macros=[], depends=headers)
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        kwargs["define_macros"].append(("RESNAS_WITH_CUDA", "1"))
        nvcc = ["-O0", "-g", "-lineinfo"] if debug else ["-O3", "-lineinfo"]
        nvcc += ["--expt-relaxed-constexpr"]
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": nvcc}
        ext = cpp_extension.CUDAExtension("resnas_kernels._C", sources + cuda_sources, **kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext = cpp_extension.CppExtension("resnas_kernels._C", sources, **kwargs)
    print(f"resnas-kernels build: torch {torch.__version__}, cuda={'yes' if build_cuda else 'no'} "
          f"(CUDA_HOME={cpp_extension.CUDA_HOME}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}), "
          f"native={native}, debug={debug}")
    class BuildExt(cpp_extension.BuildExtension):
        # pip's editable build points build_temp at a new temporary directory each time, so ninja would start from
        # nothing; a persistent directory lets it reuse its objects and header dependencies.
        def finalize_options(self):
            super().finalize_options()
            build_dir = os.environ.get("RESNAS_BUILD_DIR", "").strip()
            if build_dir:
                self.build_temp = os.path.join(ROOT, build_dir)

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


packages, package_dir = _packages()
ext_modules, cmdclass = _extensions()
setup(packages=packages, package_dir=package_dir, py_modules=["resnas_kernels_cli"], ext_modules=ext_modules,
      cmdclass=cmdclass,
      package_data={"resnas_kernels.bench": ["results/*.csv"], "resnas_kernels": ["aot_known_spills.json"]})
