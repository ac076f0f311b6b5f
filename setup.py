"""densesim: a kernel-centric engine for dense self-supervised pre-training (SIM and family).

Install on a CPU-only machine: install the CPU build of torch first (see README), then
`pip install -e ".[dev]"`; the ranges below accept the torch already there and pull nothing big.
"""
from setuptools import find_packages, setup

setup(
    name="densesim",
    version="0.1.0",
    description="Fast dense self-supervised pre-training (Siamese Image Modeling and family): "
    "Triton kernels, DALI two-view pipeline, lean training engine.",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*",
                                    "pipelines", "pipelines.*"]),
    package_data={"pipelines": ["sample_photos/*/*.jpg", "sample_photos/*.md"]},
    install_requires=[
        # Ranges, never pins: the GPU machines ship torch 2.11 + triton 3.6, CPU machines 2.13.
        "torch>=2.11,<2.14",
        "triton>=3.6,<3.8; platform_system == 'Linux'",
        # The Triton interpreter (TRITON_INTERPRET=1) imports numpy and does not declare it.
        "numpy>=1.24",
        "pillow>=9.0",
    ],
    extras_require={
        # selective search for `python -m engine.proposals` (the contrib build has ximgproc)
        "proposals": ["opencv-contrib-python-headless>=4.5"],
        # scipy: the tests' reference for the Hungarian matcher (scipy.optimize.linear_sum_assignment)
        "dev": ["pytest>=7", "pytest-benchmark>=4", "opencv-contrib-python-headless>=4.5",
                "scipy>=1.9"],
        "dali": ["nvidia-dali-cuda130"],
    },
)
