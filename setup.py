"""Builds ant_core._dp (pybind11, no torch) and ant_core._C (torch custom ops; CUDA optional).

CUDA kernels are built when torch has CUDA and nvcc is found; FORCE_CUDA=1 / FORCE_CPU=1
override. Install against the torch already present:  pip install --no-build-isolation -e .
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
CXX_FLAGS = ["-O3", "-fopenmp"]
# torch >= 2.10 headers need C++20; the header-only core in csrc/ant stays C++17.
TORCH_STD = "-std=c++20"


def rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def dp_extension():
    from pybind11.setup_helpers import Pybind11Extension

    return Pybind11Extension(
        "ant_core._dp",
        rel(glob.glob(os.path.join(CSRC, "bindings", "*.cpp"))),
        include_dirs=[CSRC],
        extra_compile_args=CXX_FLAGS,
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    )


def with_cuda(torch, cuda_home):
    if os.environ.get("FORCE_CPU", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and cuda_home is not None


def torch_extension():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    sources = rel(glob.glob(os.path.join(CSRC, "ops", "*.cpp")))
    kwargs = dict(
        include_dirs=[CSRC],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if with_cuda(torch, CUDA_HOME):
        sources += rel(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        nvcc = ["-O3", TORCH_STD, "--expt-relaxed-constexpr", "-lineinfo"]
        nvcc += os.environ.get("ANT_NVCC_FLAGS", "").split()
        return CUDAExtension(
            "ant_core._C",
            sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS + [TORCH_STD], "nvcc": nvcc},
            **kwargs,
        )
    return CppExtension(
        "ant_core._C", sources, extra_compile_args={"cxx": CXX_FLAGS + [TORCH_STD]}, **kwargs
    )


def extensions_and_cmdclass():
    try:
        import torch  # noqa: F401
    except ImportError:
        print(
            "ant-core: torch is not installed, building only ant_core._dp (the interval solver). "
            "Install torch first and reinstall with --no-build-isolation for the torch ops.",
            file=sys.stderr,
        )
        return [dp_extension()], {}
    from torch.utils.cpp_extension import BuildExtension

    return [dp_extension(), torch_extension()], {
        "build_ext": BuildExtension.with_options(use_ninja=True)
    }


ext_modules, cmdclass = extensions_and_cmdclass()

setup(
    name="ant-core",
    version="0.1.0",
    description="ANT (Addressing Negative Transfer in Diffusion Models) as a library: exact "
    "interval clustering of timesteps, fused grouped losses, multi-task methods.",
    packages=find_packages(include=["ant_core", "ant_core.*"]),
    python_requires=">=3.9",
    install_requires=["numpy", "tqdm"],
    extras_require={
        "plot": ["matplotlib"],
        "test": ["pytest", "hypothesis"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["ant=ant_core.cli:main"]},
    zip_safe=False,
)
