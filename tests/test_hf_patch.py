"""apply_pear_kernel: the patched forward against the unpatched model, fused_pear_loss and the oracle."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from pear_kernels import PEARConfig, fused_pear_loss, reference_pear_loss
from pear_kernels.transformers import (
    PEARDataCollator,
    apply_pear_kernel,
    apply_pear_kernel_to_llama,
    apply_pear_kernel_to_qwen2,
    load_pear_dataset,
    remove_pear_kernel,
)

from . import hf_utils


def _batch(n=4, seed=0, **collator_kwargs):
    tok = hf_utils.tokenizer()
    ds = load_pear_dataset(hf_utils.text_records(n, seed=seed), tok)
    return PEARDataCollator(pad_token_id=tok.pad_token_id, **collator_kwargs)([ds[i] for i in range(n)])


def _no_behavior(batch):
    return {k: v for k, v in batch.items() if k != "behavior_logprobs"}


def _grads(m):
    return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


def test_import_without_transformers_names_the_extra():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import pear_kernels\n"
        "assert 'trl' not in sys.modules\n"
        "try:\n    import pear_kernels.transformers\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install pear_kernels[hf]" in out.stdout


@pytest.mark.parametrize("arch,tied", [("qwen2", False), ("qwen3", False), ("llama", True)])
def test_variant_none_equals_unpatched_loss_and_grads(arch, tied):
    batch = _batch()
    plain = hf_utils.model(arch, tie_word_embeddings=tied).train()
    patched = copy.deepcopy(plain)
    apply_pear_kernel(patched, PEARConfig(variant="none"))
    ref = plain(**_no_behavior(batch)).loss
    ref.backward()
    out = patched(**batch)
    out.loss.backward()
    assert out.logits is None  # the fused path built no logits
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    g_ref, g = _grads(plain), _grads(patched)
    assert g.keys() == g_ref.keys()
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-4, atol=1e-6, msg=k)
    # variant none needs no behavior log-probs
    torch.testing.assert_close(patched(**_no_behavior(batch)).loss, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["token", "block", "sequence"])
def test_pear_loss_equals_fused_and_reference_on_same_hidden_states(variant):
    batch = _batch()
    cfg = PEARConfig(variant=variant, block_size=3, delta_clip=(-0.5, 0.5))
    m = apply_pear_kernel(hf_utils.model().double().train(), cfg)
    out = m(**batch)
    out.loss.backward()
    g_model = m.lm_head.weight.grad.clone()

    hidden = m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    h, y, lb = hidden[:, :-1], batch["labels"][:, 1:], batch["behavior_logprobs"][:, 1:].double()
    w = m.lm_head.weight.detach().clone().requires_grad_(True)
    fused = fused_pear_loss(h.detach(), w, y, lb, config=cfg)
    w_ref = w.detach().clone().requires_grad_(True)
    ref = reference_pear_loss(h.detach(), w_ref, y, lb, config=cfg, compute_dtype=torch.float64)
    fused.backward()
    ref.backward()
    torch.testing.assert_close(out.loss, fused, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(g_model, w.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-8, atol=1e-10)
    assert 0 < float(out.pear_metrics["mean_weight"]) <= 1.0 + 1e-6
    assert float(out.pear_metrics["num_tokens"]) == float((y != -100).sum())


def test_num_items_in_batch_makes_micro_batches_sum_to_the_full_batch():
    batch = _batch(4)
    m = apply_pear_kernel(hf_utils.model().double().train(), PEARConfig())
    full = m(**batch).loss
    full.backward()
    g_full = _grads(m)
    m.zero_grad()
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    total = 0.0
    for half in (slice(0, 2), slice(2, 4)):
        part = {k: v[half] for k, v in batch.items()}
        loss = m(**part, num_items_in_batch=torch.tensor(n_items)).loss
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-10, atol=1e-12)
    for k, g in _grads(m).items():
        torch.testing.assert_close(g, g_full[k], rtol=1e-8, atol=1e-10, msg=k)


def test_packed_rows_match_padded_rows():
    """Padding-free packing (position_ids restart) gives the padded batch's loss: no weight crosses."""
    padded = _batch(3)
    packed = _batch(3, padding_free=True)
    assert packed["input_ids"].shape[0] == 1 and "position_ids" in packed
    m = apply_pear_kernel(hf_utils.model().double().train(), PEARConfig(delta_clip=(-1.0, 1.0)))
    a = m(**padded)
    b = m(**packed)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(b.pear_metrics["num_tokens"], a.pear_metrics["num_tokens"])
    torch.testing.assert_close(b.pear_metrics["mean_weight"], a.pear_metrics["mean_weight"], rtol=1e-9, atol=1e-10)


def test_other_paths_behave_exactly_as_before():
    batch = _batch(2)
    plain = hf_utils.model()
    patched = apply_pear_kernel(copy.deepcopy(plain), PEARConfig())
    for mode in ("eval", "train"):
        getattr(plain, mode)()
        getattr(patched, mode)()
        nolabels = {k: v for k, v in batch.items() if k not in ("labels", "behavior_logprobs")}
        torch.testing.assert_close(patched(**nolabels, behavior_logprobs=batch["behavior_logprobs"]).logits,
                                   plain(**nolabels).logits)
    plain.eval()
    patched.eval()
    a, b = plain(**_no_behavior(batch)), patched(**batch)
    torch.testing.assert_close(b.loss, a.loss)
    torch.testing.assert_close(b.logits, a.logits)
    ids = batch["input_ids"][:1, :5]
    torch.testing.assert_close(patched.generate(ids, max_new_tokens=3, do_sample=False),
                               plain.generate(ids, max_new_tokens=3, do_sample=False))


def test_return_dict_false_and_missing_behavior_logprobs():
    batch = _batch(2)
    m = apply_pear_kernel(hf_utils.model().train(), PEARConfig())
    tup = m(**batch, return_dict=False)
    assert isinstance(tup, tuple) and torch.is_tensor(tup[0]) and tup[0].dim() == 0
    with pytest.raises(ValueError, match="behavior_logprobs is required"):
        m(**_no_behavior(batch))
    with pytest.raises(ValueError, match="behavior_logprobs must have input_ids' shape"):
        m(**{**batch, "behavior_logprobs": batch["behavior_logprobs"][:, 1:]})


def test_class_shortcuts_patch_and_remove():
    import transformers

    cls = transformers.Qwen2ForCausalLM
    original = cls.forward
    try:
        apply_pear_kernel_to_qwen2(config=PEARConfig(variant="none"))
        m = hf_utils.model("qwen2").train()
        batch = _batch(2)
        assert m(**batch).logits is None and "pear_metrics" in m(**batch)
        import inspect

        assert "behavior_logprobs" in inspect.signature(m.forward).parameters
    finally:
        remove_pear_kernel(cls)
    assert cls.forward is original
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        apply_pear_kernel_to_llama(hf_utils.model("qwen2"))
    with pytest.raises(TypeError):
        apply_pear_kernel(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="config must be a PEARConfig"):
        apply_pear_kernel(hf_utils.model(), {"variant": "token"})


def test_refuses_logit_transforms():
    m = hf_utils.model()
    m.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        apply_pear_kernel(m)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_softcapped_logits_match_the_model(arch):
    """Gemma 2/3 soft-cap their logits (final_logit_softcapping): the patched loss passes the
    cap to the kernel; plain SFT then equals the model's own loss, values and gradients."""
    if arch == "gemma3":
        pytest.importorskip("transformers.models.gemma3")
    m = hf_utils.model(arch, seed=0).train()
    with torch.no_grad():  # logits of magnitude ~5, so that a cap of 2 changes them
        m.get_output_embeddings().weight.mul_(30.0)
    ref = copy.deepcopy(m)
    apply_pear_kernel(m, PEARConfig(variant="none"))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 40, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    out = m(input_ids=ids, labels=labels)
    want = ref(input_ids=ids, labels=labels)
    out.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    for (name, p1), p2 in zip(m.named_parameters(), ref.parameters()):
        if p1.grad is not None:
            # gradients reach ~10 at this logit scale; atol 1e-5 is fp32 round-off on them (transformers
            # 4.56's own loss rounds one embedding-gradient element 2.6e-6 away)
            torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-5, msg=name)
    # the cap matters at this scale: without it the loss would differ
    ref.config.final_logit_softcapping = None
    assert abs(float(ref(input_ids=ids, labels=labels).loss) - float(want.loss)) > 1e-3


# --- the head is read through its module ---------------------------------------------------


class _GatheredLinear(nn.Module):
    """Stands in for a ZeRO-3 / FSDP2 head: the weight exists only inside its forward."""

    def __init__(self, full: nn.Linear):
        super().__init__()
        self.shard = nn.Parameter(full.weight.detach().clone())
        self.weight = torch.empty(0)
        self.bias = None
        self.calls = 0
        self.register_forward_pre_hook(self._gather)
        self.register_forward_hook(self._release)

    def _gather(self, module, args):
        self.calls += 1
        self.weight = self.shard * 1.0  # differentiable view of the "gathered" parameter

    def _release(self, module, args, output):
        self.weight = torch.empty(0)

    def forward(self, x):
        return x @ self.weight.t()


class _ModulesToSave(nn.Module):
    """Duck-typed peft ModulesToSaveWrapper."""

    def __init__(self, original):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(original)})
        self.active_adapter = "default"
        self.disable_adapters = False

    def forward(self, x):
        return self.modules_to_save["default"](x)


class _LoraLinear(nn.Module):
    """Duck-typed peft LoRA Linear."""

    def __init__(self, base: nn.Linear, r=2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        nn.init.normal_(self.lora_B["default"].weight, std=0.1)
        self.scaling = {"default": 0.5}
        self.active_adapters = ["default"]
        self.merged = False
        self.disable_adapters = False

    def get_delta_weight(self, a):
        return self.lora_B[a].weight @ self.lora_A[a].weight * self.scaling[a]

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)) * self.scaling["default"]


@pytest.mark.parametrize("wrapper", ["gathered", "modules_to_save", "lora"])
def test_wrapped_heads_match_their_own_forward(wrapper):
    """The loss through a wrapped head equals the unpatched model's loss with that head (variant none),
    and the gradient reaches the wrapper's trainable parameters."""
    batch = _batch(2)
    m = hf_utils.model().double().train()
    head = m.lm_head
    if wrapper == "gathered":
        m.lm_head = _GatheredLinear(head)
        trainable = m.lm_head.shard
    elif wrapper == "modules_to_save":
        m.lm_head = _ModulesToSave(head)
        trainable = m.lm_head.modules_to_save["default"].weight
    else:
        m.lm_head = _LoraLinear(head).double()
        trainable = m.lm_head.lora_B["default"].weight
    ref_model = copy.deepcopy(m)
    ref = ref_model(**_no_behavior(batch)).loss
    ref.backward()
    apply_pear_kernel(m, PEARConfig(variant="none"))
    out = m(**batch)
    out.loss.backward()
    # the stock loss upcasts logits to float32, so compare at float32 precision
    torch.testing.assert_close(out.loss.float(), ref, rtol=1e-6, atol=1e-6)
    ref_trainable = dict(ref_model.named_parameters())[[k for k, p in m.named_parameters() if p is trainable][0]]
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0
    torch.testing.assert_close(trainable.grad, ref_trainable.grad, rtol=1e-5, atol=1e-7)
    if wrapper == "gathered":
        assert m.lm_head.calls == 1 and m.lm_head.weight.numel() == 0  # gathered once, released after
    if wrapper == "modules_to_save":
        assert m.lm_head.original_module.weight.grad is None
    assert "forward" not in m.lm_head.__dict__  # the redirection was undone


def test_autocast_matches_the_stock_head_under_autocast():
    batch = _batch(2)
    plain = hf_utils.model().train()
    patched = apply_pear_kernel(copy.deepcopy(plain), PEARConfig(variant="none"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = plain(**_no_behavior(batch)).loss
        out = patched(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and patched.lm_head.weight.grad is not None
    torch.testing.assert_close(out.loss.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_packed_sequence_ids_from_positions_seq_idx_and_cu_seqlens():
    from pear_kernels.transformers.patch import _packed_sequence_ids

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    want = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert torch.equal(_packed_sequence_ids(pos, None, pos.shape), want)
    assert torch.equal(_packed_sequence_ids(None, want.int(), pos.shape), want)
    assert torch.equal(_packed_sequence_ids(None, None, pos.shape, torch.tensor([0, 3, 5, 9])), want)
    rows = torch.arange(5).expand(2, 5)  # ordinary rows: not packed
    assert _packed_sequence_ids(rows, None, rows.shape) is None
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        _packed_sequence_ids(None, None, pos.shape, torch.tensor([0, 3, 8]))


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = _batch(2)
    a = apply_pear_kernel(hf_utils.model().double().train(), PEARConfig())
    b = copy.deepcopy(a)
    b.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    la, lb = a(**batch).loss, b(**batch).loss
    la.backward()
    lb.backward()
    torch.testing.assert_close(lb, la, rtol=1e-12, atol=1e-12)
    gb = _grads(b)
    for k, g in _grads(a).items():
        torch.testing.assert_close(gb[k], g, rtol=1e-9, atol=1e-12, msg=k)
