"""moekd_kernels: the MoE-KD distillation loss with fused CPU, Triton and CUDA kernels.

The C++ and CUDA kernels are JIT-built on first use (torch.utils.cpp_extension),
so installing the package needs no compiler and no torch at build time.
"""

from setuptools import find_packages, setup

setup(
    name="moekd_kernels",
    version="0.1.0",
    description="Fused MoE-KD (mixture-of-experts knowledge distillation) loss for large class counts",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["moekd_kernels", "moekd_kernels.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "ninja",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "demo": ["scikit-learn", "matplotlib"],
        "test": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "psutil",
            "scikit-learn",
            "matplotlib",
            "transformers",
            "accelerate>=1.1.0",  # transformers.Trainer needs it
            "triton>=3.0",
        ],
    },
)
