"""moekd_kernels: the MoE-KD distillation loss with fused CPU, Triton and CUDA kernels.

The C++ and CUDA kernels are JIT-built on first use (torch.utils.cpp_extension),
so installing the package needs no compiler and no torch at build time.
"""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithKernelSources(build_py):
    """Copy csrc/ into the built package, so a non-editable install can JIT-build
    the kernels too (the backends look in moekd_kernels/csrc, then ../csrc)."""

    def run(self):
        super().run()
        if not self.dry_run:
            shutil.copytree(Path(__file__).parent / "csrc",
                            Path(self.build_lib) / "moekd_kernels" / "csrc", dirs_exist_ok=True)


setup(
    name="moekd_kernels",
    version="0.1.0",
    description="Fused MoE-KD (mixture-of-experts knowledge distillation) loss for large class counts",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["moekd_kernels", "moekd_kernels.*"]),
    cmdclass={"build_py": BuildPyWithKernelSources},
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
            "trl>=1.16",  # python/trl_gkd_distillation.py: GKD under trl.experimental
            "triton>=3.0",
        ],
    },
)
