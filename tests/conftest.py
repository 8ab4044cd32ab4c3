"""Session-wide test setup.

Triton decides when it is first imported whether @jit code (its own standard library
included) is compiled or run by its CPU interpreter. Without a GPU only the interpreter can
run Triton kernels, so it is chosen here, before any test module imports triton
(tests/test_triton_interpreter.py runs the kernels under it; tests/test_triton_compile.py
compiles them in a child process without it). With CUDA nothing is set and the interpreter
tests skip unless TRITON_INTERPRET=1 is given.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
