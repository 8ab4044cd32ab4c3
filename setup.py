"""pear_kernels: fused PEAR loss kernels for SFT that prepares for RL."""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

extras = {
    # Hugging Face models, Trainer and TRL's SFTTrainer
    "hf": ["transformers>=4.46", "trl>=0.19", "tokenizers>=0.20", "accelerate>=1.0"],
    # GPU kernels (and their CPU interpreter tests)
    "triton": ["triton>=3.1"],
    # benchmarks against the naive loss and the peers
    "bench": ["pytest-benchmark>=4.0", "liger-kernel>=0.5", "matplotlib>=3.7"],
    # optional extra task source for pear_kernels.rl (needs Python >= 3.11)
    "reasoning-gym": ["reasoning-gym>=0.1; python_version >= '3.11'"],
    "dev": ["pytest>=8.0", "hypothesis>=6.100", "ruff>=0.5", "pytest-timeout>=2.2"],
}
extras["all"] = sorted({req for reqs in extras.values() for req in reqs})

setup(
    name="pear_kernels",
    version="0.1.0",
    description="Fused PEAR loss kernels (importance-weighted SFT that prepares for RL)",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pear_kernels", "pear_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4,<3"],
    extras_require=extras,
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
