"""Session-wide test setup and shared builders: random PEAR problems with prompts, gaps, padding.

Triton decides when it is first imported whether @jit code (its own standard library
included) is compiled or run by its CPU interpreter. Without a GPU only the interpreter can
run Triton kernels, so it is chosen here, before any test module imports triton
(tests/test_triton_interpreter.py runs the kernels under it; tests/test_triton_compile.py
compiles them in a child process without it). With CUDA nothing is set and the interpreter
tests skip unless TRITON_INTERPRET=1 is given.
"""

from __future__ import annotations

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _restore_accelerate_mixed_precision():
    """transformers < 5's TrainingArguments writes ACCELERATE_MIXED_PRECISION into os.environ ("bf16"
    under TRL's SFTConfig default) and later arguments with bf16=False keep it, so accelerate would
    wrap the next trainer's forward in autocast: each test gets back the value it started with."""
    before = os.environ.get("ACCELERATE_MIXED_PRECISION")
    yield
    if before is None:
        os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    else:
        os.environ["ACCELERATE_MIXED_PRECISION"] = before


def make_problem(
    shape=(3, 13),
    hidden_size=24,
    vocab=1001,
    dtype=torch.float32,
    *,
    seed=0,
    prompt=3,
    gaps=True,
    pad_last=2,
    logit_scale=2.0,
    behavior_spread=0.5,
    bias=False,
):
    """hidden (*shape, H), weight (V, H), labels, behavior log-probs (near the model's own).

    Labels are ignore_index on each row's first ``prompt`` tokens, on a gap in the middle and
    on ``pad_last`` trailing pad tokens of the last row, so sequences have masked spans inside.
    behavior_logprobs = a random perturbation of a plausible log-prob, so log-ratios straddle
    the default delta clip rather than all sitting at one end.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) * (logit_scale / hidden_size**0.5)
    labels = torch.randint(0, vocab, shape, generator=g)
    flat = labels.view(-1, shape[-1]) if len(shape) == 2 else labels.view(1, -1)
    flat[:, :prompt] = -100
    if gaps and flat.shape[1] > prompt + 4:
        mid = (prompt + flat.shape[1]) // 2
        flat[:, mid : mid + 2] = -100
    if pad_last:
        flat[-1, -pad_last:] = -100
    with torch.no_grad():
        logits = hidden @ weight.t()
        logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    behavior = (logp + behavior_spread * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(max=0.0)
    b = (torch.randn(vocab, generator=g, dtype=torch.float64) * 0.1) if bias else None
    out = [hidden.to(dtype), weight.to(dtype), labels, behavior.to(torch.float32)]
    out.append(b.to(dtype) if b is not None else None)
    return out


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


@pytest.fixture
def problem_factory():
    return make_problem


def _cpu_backends():
    from pear_kernels.kernels import native_cpu

    return ["torch"] + (["native"] if native_cpu.available() else [])


@pytest.fixture(params=_cpu_backends())
def cpu_backend(request, monkeypatch):
    """Run a test once per CPU backend (the chunked PyTorch path, and the native one if built)."""
    monkeypatch.setenv("PEAR_KERNELS_BACKEND", request.param)
    return request.param
