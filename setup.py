"""Builds s2o._C against the PyTorch already installed (use pip's --no-build-isolation).

A CUDA extension is built when the installed torch is a CUDA build and nvcc is found (no GPU is
needed to build); otherwise a C++-only extension with the CPU kernels. S2O_BUILD_CUDA=0 forces
the CPU-only build, S2O_BUILD_CUDA=1 makes a missing CUDA toolchain an error.
TORCH_CUDA_ARCH_LIST defaults to Ampere and Hopper ("8.0;9.0a").
"""

import glob
import os
import re
import shutil

# torch guesses the CUDA toolkit from the nvcc on PATH; a wrapper script there (as on our dev
# machines: /usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc) makes it guess /usr/local.
# Prefer the standard toolkit location when the user has not chosen one.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

DEFAULT_ARCH_LIST = "8.0;9.0a"


def cuda_toolchain_found() -> bool:
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    return (
        os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc") is not None
    )


def build_cuda() -> bool:
    choice = os.environ.get("S2O_BUILD_CUDA", "auto")
    if choice not in ("auto", "0", "1"):
        raise ValueError(f"S2O_BUILD_CUDA must be auto, 0 or 1, got {choice!r}")
    found = cuda_toolchain_found()
    if choice == "1" and not found:
        raise RuntimeError(
            "S2O_BUILD_CUDA=1 but no CUDA toolchain: torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
        )
    return found and choice != "0"


def builds_sm90a(arch_list: str) -> bool:
    """Whether TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0a") makes torch compile sm_90a code."""
    return any(arch.startswith("9.0a") for arch in re.split(r"[;,\s]+", arch_list))


def extension():
    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(here, "csrc")
    sources = [os.path.join("csrc", "registration.cpp")]
    sources += sorted(
        os.path.relpath(p, here) for p in glob.glob(os.path.join(csrc, "cpu", "*.cpp"))
    )
    include_dirs = [csrc, os.path.join(csrc, "include")]
    cxx_flags = ["-O3"]
    link_flags = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is inlined from ATen's OpenMP header: without -fopenmp it runs serially.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if build_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        sources += sorted(
            os.path.relpath(p, here)
            for p in glob.glob(os.path.join(csrc, "cuda", "**", "*.cu"), recursive=True)
        )
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        macros = []
        if builds_sm90a(os.environ["TORCH_CUDA_ARCH_LIST"]):
            macros.append(("S2O_WITH_SM90A", "1"))  # the host may launch the wgmma kernel
        return CUDAExtension(
            "s2o._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    return CppExtension(
        "s2o._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


setup(
    packages=find_packages(include=["s2o", "s2o.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
