"""FSDP2 on CPU (gloo, one process): the head's weight is gathered by its own forward hook."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist

from pear_kernels import PEARConfig
from pear_kernels.transformers import PEARDataCollator, apply_pear_kernel, load_pear_dataset
from pear_kernels.transformers import patch as patch_mod

from . import hf_utils

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available() or not hasattr(fsdp, "fully_shard"):
    pytest.skip("torch.distributed FSDP2 is not available", allow_module_level=True)


@pytest.fixture
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fully_sharded_head_matches_unsharded_model(process_group, monkeypatch):
    tok = hf_utils.tokenizer()
    batch = PEARDataCollator(pad_token_id=tok.pad_token_id)(list(load_pear_dataset(hf_utils.text_records(3), tok)))
    plain = hf_utils.model().train()
    ref = plain(**{k: v for k, v in batch.items() if k != "behavior_logprobs"}).loss
    ref.backward()

    m = copy.deepcopy(plain)
    m.zero_grad(set_to_none=True)
    fsdp.fully_shard(m.lm_head)
    for layer in m.model.layers:
        fsdp.fully_shard(layer)
    fsdp.fully_shard(m)
    assert type(m.lm_head.weight).__name__ == "DTensor"  # outside its forward, a shard
    apply_pear_kernel(m, PEARConfig(variant="none"))
    seen = []
    real = patch_mod.fused_pear_loss

    def spy(hidden, weight, *args, **kwargs):
        seen.append(type(weight).__name__)
        return real(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(patch_mod, "fused_pear_loss", spy)
    out = m(**batch)
    out.loss.backward()
    assert len(seen) == 1 and seen[0] != "DTensor"  # inside the head's forward FSDP had unsharded it
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    grad = m.lm_head.weight.grad
    grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    torch.testing.assert_close(grad, plain.lm_head.weight.grad, rtol=1e-4, atol=1e-6)
