"""Build distkern_example_kernel._C with distkern's build helpers (same CPU/CUDA rules as distkern itself):

    pip install --no-build-isolation -e .     # torch and distkern must be installed first

CPU kernels always; CUDA kernels when torch is a CUDA build and nvcc is found (DISTKERN_CUDA=1 forces,
DISTKERN_CUDA=0 skips them; TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0+PTX" without a visible GPU).
"""
import glob

from setuptools import setup

from distkern.cpp_extension import DistkernExtension, build_ext

setup(
    ext_modules=[DistkernExtension("distkern_example_kernel._C", sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu")),
                                   include_dirs=["csrc"])],
    cmdclass={"build_ext": build_ext},
)
