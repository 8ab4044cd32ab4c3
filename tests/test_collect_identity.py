"""A collection is one teacher, one tokenizer: resume fingerprint, lock, file modes, id checks."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from pear_kernels.transformers import collect as collect_mod
from pear_kernels.transformers import collect_behavior_logprobs, load_pear_dataset
from pear_kernels.transformers.data import DataFormatError, MisalignedExampleError

from . import hf_utils


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    model_dir = hf_utils.save_model_dir(root / "teacher", seed=3)
    recs = hf_utils.text_records(4)
    for r in recs:
        r.pop("behavior_logprobs")
    data = hf_utils.write_jsonl(root / "data.jsonl", recs)
    return root, model_dir, data


def _opts(**kw):
    return {"tokenizer": hf_utils.tokenizer(), "shard_size": 2, "max_tokens_per_batch": 64, "progress": False,
            "shard_format": "jsonl", **kw}


def test_resaved_weights_are_refused(setup, tmp_path):
    root, _, data = setup
    model_dir = hf_utils.save_model_dir(tmp_path / "teacher", seed=3)
    out = tmp_path / "out"
    collect_behavior_logprobs(model_dir, data, str(out), **_opts(max_new_shards=1))
    hf_utils.model(seed=4).save_pretrained(model_dir)  # other weights, same directory
    with pytest.raises(ValueError, match="different model weights"):
        collect_behavior_logprobs(model_dir, data, str(out), **_opts())


@pytest.mark.parametrize("change,name", [
    (dict(dtype=torch.bfloat16), "dtype"),
    (dict(append_eos=True), "append_eos"),
    (dict(max_length=7), "max_length"),
])
def test_changed_settings_are_refused_by_name(setup, tmp_path, change, name):
    _, model_dir, data = setup
    out = tmp_path / "out"
    collect_behavior_logprobs(model_dir, data, str(out), **_opts(max_new_shards=1, append_eos=False))
    with pytest.raises(ValueError, match=name):
        collect_behavior_logprobs(model_dir, data, str(out), **_opts(**{"append_eos": False, **change}))


def test_other_tokenizer_is_refused(setup, tmp_path):
    _, model_dir, data = setup
    out = tmp_path / "out"
    collect_behavior_logprobs(model_dir, data, str(out), **_opts(max_new_shards=1))
    tok = hf_utils.tokenizer()
    other = type(tok)(tokenizer_object=tok.backend_tokenizer, eos_token="<unk>")  # another special token
    with pytest.raises(ValueError, match="tokenizer"):
        collect_behavior_logprobs(model_dir, data, str(out), **_opts(tokenizer=other))


def test_second_collector_refused_and_stale_lock_taken_over(setup, tmp_path):
    _, model_dir, data = setup
    out = tmp_path / "out"
    out.mkdir()
    lock = out / collect_mod.LOCK
    lock.write_text(json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname()}))
    with pytest.raises(ValueError, match="another collector"):
        collect_behavior_logprobs(model_dir, data, str(out), **_opts())
    assert lock.exists()  # the live owner's lock is left alone
    # a lock whose process is gone is stale
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": __import__("socket").gethostname()}))
    res = collect_behavior_logprobs(model_dir, data, str(out), **_opts())
    assert res.complete and not lock.exists()


def test_files_keep_the_umask_permissions(setup, tmp_path):
    _, model_dir, data = setup
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        collect_behavior_logprobs(model_dir, data, str(out), **_opts())
    finally:
        os.umask(old)
    for name in os.listdir(out):
        mode = stat.S_IMODE(os.stat(out / name).st_mode)
        assert mode == 0o644, (name, oct(mode))


def test_training_tokenizer_must_match_the_stored_ids(setup, tmp_path):
    _, model_dir, data = setup
    out = tmp_path / "out"
    collect_behavior_logprobs(model_dir, data, str(out), **_opts())
    assert len(load_pear_dataset(str(out), hf_utils.tokenizer())) == 4
    # the same vocabulary with another pre-tokenizer splits the text differently
    from tokenizers import pre_tokenizers

    tok = hf_utils.tokenizer()
    backend = tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    other = type(tok)(tokenizer_object=backend, unk_token=tok.unk_token, eos_token=tok.eos_token,
                      bos_token=tok.bos_token, pad_token=tok.pad_token)
    with pytest.raises(MisalignedExampleError, match="not this tokenizer's tokenization"):
        load_pear_dataset(str(out), other)
    ds = load_pear_dataset(str(out), other, skip_misaligned=True)
    assert ds.num_skipped == 4


@pytest.mark.parametrize("bad", [10**6, -1, 2**70])
def test_ids_outside_the_vocabulary_are_refused(bad, tmp_path):
    tok = hf_utils.tokenizer()
    rec = {"prompt_ids": [1, 2, 3], "response_ids": [4, bad, 5], "behavior_logprobs": [-0.1, -0.2, -0.3]}
    path = hf_utils.write_jsonl(tmp_path / "d.jsonl", [rec])
    with pytest.raises(DataFormatError, match="outside"):
        load_pear_dataset(path, tok)
    if bad != 10**6:  # without a tokenizer only impossible ids can be caught
        with pytest.raises(DataFormatError, match="outside"):
            load_pear_dataset(path)


def test_collected_rows_get_the_jsonl_type_checks(setup, tmp_path):
    _, model_dir, data = setup
    out = tmp_path / "out"
    collect_behavior_logprobs(model_dir, data, str(out), **_opts())
    shard = out / "shard-00000.jsonl"
    rows = [json.loads(x) for x in shard.read_text().splitlines()]
    rows[0]["prompt"] = 12345  # not a string
    shard.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataFormatError, match="'prompt' must be a string"):
        load_pear_dataset(str(out), hf_utils.tokenizer())
