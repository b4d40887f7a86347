"""Build fusedrnn.

Always installs the Python package (reference backend) and the Triton kernels
(shipped as fusedrnn.triton_kernels from ./triton_kernels). Compiled parts:

  fusedrnn._C          csrc/cpu/*.cpp: C++ CPU kernels, registered for the CPU dispatch key.
  fusedrnn._C_cuda     csrc/cuda/*.cu + csrc/cuda/*.cpp: CUDA kernels, registered for the CUDA
                       dispatch key (built when nvcc is found, GPU or not).
  fusedrnn._emulated   csrc/emulation/*.cpp: the CUDA kernel sources compiled by the host
                       compiler against the CPU emulation of the CUDA execution model.
Shared headers (each cell's pointwise math) live in csrc/.

Environment switches:
  FUSEDRNN_BUILD_CUDA=1|0   build the CUDA kernels (default: if nvcc is found). Works with no
                            GPU present, unlike torch's own detection.
  FUSEDRNN_NO_EXT=1         skip every compiled part (pure-Python install).
  FUSEDRNN_REQUIRE_EXT=1    fail the install if a compiled part fails to build (CI sets it;
                            by default a failed build leaves a working pure-Python install).
  FUSEDRNN_EXTENSIONS=_C,_emulated   build only these (for quick rebuilds while developing).
  TORCH_CUDA_ARCH_LIST      defaults to "7.5;8.0;9.0+PTX" plus the architecture of each GPU
                            visible at build time, when building CUDA (see default_cuda_archs).
"""
import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """CUDA_HOME from the environment, else the directory holding nvcc (not /usr/local)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _want_cuda():
    flag = os.environ.get("FUSEDRNN_BUILD_CUDA", "").strip()
    if flag == "0":
        return None
    home = _find_cuda_home()
    if flag == "1" and not home:
        sys.exit("FUSEDRNN_BUILD_CUDA=1 but no nvcc found (set CUDA_HOME)")
    return home


# Turing (7.5: T4) and later under CUDA 13; 8.0 cubins run on 8.6/8.7/8.9 (A10, RTX 30xx/40xx,
# L4) too, and 9.0's PTX compiles for newer GPUs at load time. Elsewhere the cuda backend
# refuses the call and says so (fusedrnn/backends/native.py, kernel_image_missing).
DEFAULT_CUDA_ARCHS = ["7.5", "8.0", "9.0+PTX"]


def default_cuda_archs():
    """DEFAULT_CUDA_ARCHS plus the architecture of each GPU visible now (torch's own default
    would be those alone, and with no GPU it crashes)."""
    archs = list(DEFAULT_CUDA_ARCHS)
    try:
        import torch
        local = {"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    except Exception:  # (no driver, no torch CUDA build: the defaults)
        local = set()
    return ";".join(sorted(local - {a.split("+")[0] for a in archs}) + archs)


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extensions():
    if _env_flag("FUSEDRNN_NO_EXT"):
        return [], {}
    cuda_home = _want_cuda()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when imported: set it first.
        os.environ["CUDA_HOME"] = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_archs()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    optional = not _env_flag("FUSEDRNN_REQUIRE_EXT")
    # torch >= 2.10 headers need C++20. -ffp-contract=fast: a * b + c becomes an FMA where the
    # ISA has one (C++20's ISO mode turns that off), so the cells' formulas run on AVX2
    # vectors (csrc/cpu/kernels.cpp, V8) as fast as the intrinsics they replaced.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=fast"]
    include = [os.path.join(ROOT, "csrc")]
    exts = []

    only = [x.strip() for x in os.environ.get("FUSEDRNN_EXTENSIONS", "").split(",") if x.strip()]

    def wanted(name):
        return not only or name in only

    # CPU kernels and the op registration for the CPU dispatch key.
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    if sources and wanted("_C"):
        exts.append(CppExtension("fusedrnn._C", sources, include_dirs=include,
                                 extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
                                 optional=optional))

    # CUDA kernels (csrc/cuda/*.cu) and their registration for the CUDA dispatch key (csrc/cuda/*.cpp).
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) +
                        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    if cuda_home and cuda_sources and wanted("_C_cuda"):
        # ATen's CUDA headers include cuBLAS/cuSPARSE headers, shipped in the nvidia wheels.
        nv_include = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13", "include")
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-Xptxas=-v", "-lineinfo"]
        exts.append(CUDAExtension(
            "fusedrnn._C_cuda", cuda_sources, include_dirs=include + [nv_include],
            extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": nvcc}, optional=optional))

    # The CUDA kernel sources compiled for the CPU emulation of the CUDA execution model.
    emulated = _rel(glob.glob(os.path.join(ROOT, "csrc", "emulation", "*.cpp")))
    if emulated and wanted("_emulated"):
        exts.append(CppExtension("fusedrnn._emulated", emulated, include_dirs=include,
                                 extra_compile_args={"cxx": ["-O2", "-std=c++20"]},  # torch >= 2.10 headers need C++20
                                 extra_link_args=["-lpthread"], optional=optional))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="fusedrnn",
    version="0.1.0",
    description="Fused LSTM/GRU/RNN kernels (C++, CUDA, Triton) behind drop-in torch.nn modules",
    python_requires=">=3.9",
    packages=["fusedrnn", "fusedrnn.backends", "fusedrnn.triton_kernels"],
    package_dir={"fusedrnn.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton"], "dev": ["pytest", "pytest-benchmark", "ninja", "pybind11"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
