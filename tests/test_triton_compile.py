"""Every Triton kernel compiles to a cubin for Ampere (sm80) and Hopper (sm90), without a GPU.

The work happens in tests/triton_compile_check.py, in a child process: compiling needs Triton
imported without TRITON_INTERPRET, the interpreter tests need it imported with it, and Triton
fixes that choice at its first import. Its per-kernel register and spill report is printed
(pytest -s) and explains the autotune configs in kernels/triton_fused.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install pear_kernels[triton])", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "triton_compile_check.py")


def test_every_kernel_compiles_for_sm80_and_sm90():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    proc = subprocess.run([sys.executable, SCRIPT, "80", "90"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    assert "OK: every kernel compiled for sm80, sm90" in proc.stdout
