"""pear_kernels: fused PEAR loss kernels for SFT that prepares for RL."""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

# Floors: the lowest releases the Hugging Face tests (tests/test_hf_*, test_cli, test_collect_*,
# test_rl_*) passed with, tested 2026-12-05 (`make floor-test` reruns them at these pins):
# "hf": transformers 4.56.1, trl 0.23.0, accelerate 1.4.0, datasets 3.0.0, tokenizers 0.22.0 (and
# the newest, transformers 5.23 / trl 1.16 / datasets 5.2). trl 0.22 fails (its SFTConfig has no
# loss_type) and trl 0.23 needs transformers >= 4.56.1 and accelerate >= 1.4. "rl":
# transformers 4.46.1 with tokenizers 0.20.0; transformers 4.45's Qwen2 forward refuses logits_to_keep.
extras = {
    # Hugging Face models, Trainer and TRL's SFTTrainer
    "hf": ["transformers>=4.56.1", "trl>=0.23.0", "tokenizers>=0.22.0", "accelerate>=1.4.0", "datasets>=3.0.0",
           "pyarrow>=12"],
    # the bundled SFT-then-RL loop and `make demo`: a tiny Qwen2 built from a config
    "rl": ["transformers>=4.46.1", "tokenizers>=0.20.0"],
    # GPU kernels (and their CPU interpreter tests)
    "triton": ["triton>=3.1"],
    # benchmarks against the naive loss and the peers
    # (pytest-timeout: pytest.ini sets --timeout, so `pytest benchmarks` needs it too)
    "bench": ["pytest-benchmark>=4.0", "liger-kernel>=0.5", "matplotlib>=3.7", "pytest>=8.0", "pytest-timeout>=2.2",
              "cut-cross-entropy>=25.1"],
    # optional extra task source for pear_kernels.rl (needs Python >= 3.11)
    "reasoning-gym": ["reasoning-gym>=0.1; python_version >= '3.11'"],
    "dev": ["pytest>=8.0", "hypothesis>=6.100", "ruff>=0.5", "pytest-timeout>=2.2", "peft>=0.13"],
}
extras["all"] = sorted({req for reqs in extras.values() for req in reqs})


def native_extension():
    """The optional C++ row-pass extension (csrc/), built when torch is importable here.

    Under pip's default build isolation torch is absent from the build environment and the
    package installs as pure Python (the PyTorch path is used); `make` installs with
    --no-build-isolation so the extension is built against the torch in the environment.
    PEAR_KERNELS_NATIVE=0 skips it; PEAR_KERNELS_NATIVE_ARCH sets -march (default: native,
    since a source build runs where it is built). A failed compile warns and installs the
    package without it: pear_kernels.native_status() says which path is active.
    """
    if os.environ.get("PEAR_KERNELS_NATIVE", "1") == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "NOTE: pear_kernels' optional C++ row pass (csrc/) is not built: torch is not importable in "
            "this build environment (pip's build isolation). The package works without it (the PyTorch "
            "path); to build it: pip install torch, then pip install --no-build-isolation -e ."
        )
        return [], {}

    class OptionalBuildExt(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # a missing compiler must not break the install
                print(f"WARNING: pear_kernels native extension not built ({exc}); using the PyTorch path")

    arch = os.environ.get("PEAR_KERNELS_NATIVE_ARCH", "native")
    ext = CppExtension(
        "pear_kernels.kernels._native",
        ["csrc/pear_rows.cpp"],
        # -fopenmp: at::parallel_for is a header template; without it the rows run on one thread
        extra_compile_args=["-O3", "-fopenmp", f"-march={arch}"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = native_extension()

setup(
    name="pear_kernels",
    version="0.1.0",
    description="Fused PEAR loss kernels (importance-weighted SFT that prepares for RL)",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pear_kernels", "pear_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4,<3", "numpy"],
    extras_require=extras,
    entry_points={"console_scripts": ["pear-kernels = pear_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
