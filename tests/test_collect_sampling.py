"""Behavior log-probs of the distribution the teacher sampled from (temperature, top-k, top-p,
min-p), against a direct computation written as loops over the vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from pear_kernels.transformers import collect_behavior_logprobs, read_collected  # noqa: E402
from pear_kernels.transformers.sampling import SamplingSettings, processed_logprobs  # noqa: E402

from . import hf_utils  # noqa: E402


def _loop(logits_row, y, T, top_k, top_p, min_p):
    """HF generate's order: temperature, top-k, top-p, min-p; renormalise over what is kept."""
    V = len(logits_row)
    z = [x / T for x in logits_row]
    mx = max(z)
    e = [math.exp(x - mx) for x in z]
    s = sum(e)
    p = [x / s for x in e]
    kept = set(range(V))
    if top_k:
        kth = sorted(p, reverse=True)[top_k - 1]
        kept = {v for v in kept if p[v] >= kth}
    if top_p < 1.0:
        tot = sum(p[v] for v in kept)
        q = {v: p[v] / tot for v in kept}
        acc, nucleus = 0.0, set()
        for v in sorted(kept, key=lambda v: -q[v]):
            if acc < top_p or not nucleus:
                nucleus.add(v)
            acc += q[v]
        kept = nucleus
    if min_p > 0.0:
        tot = sum(p[v] for v in kept)
        q = {v: p[v] / tot for v in kept}
        pmax = max(q.values())
        kept = {v for v in kept if q[v] >= min_p * pmax}
    if y not in kept:
        return float("-inf")
    return math.log(p[y] / sum(p[v] for v in kept))


@pytest.mark.parametrize("settings", [
    dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1),
    dict(temperature=1.3, top_k=12, top_p=0.9, min_p=0.05),
])
def test_processed_logprobs_match_direct_loop(settings):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 30, generator=g, dtype=torch.float64) * 2
    s = SamplingSettings(**settings)
    # targets: the most likely token of each row and a random one (often excluded)
    for targets in (logits.argmax(-1), torch.randint(0, 30, (9,), generator=g)):
        got, kept = processed_logprobs(logits, targets, s)
        for r in range(9):
            want = _loop(logits[r].tolist(), int(targets[r]), s.temperature, s.top_k, s.top_p, s.min_p)
            if want == float("-inf"):
                assert got[r] == float("-inf") and not kept[r]
            else:
                assert float(got[r]) == pytest.approx(want, abs=1e-9)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    model_dir = hf_utils.save_model_dir(root / "teacher", seed=3)
    recs = hf_utils.text_records(3)
    for r in recs:
        r.pop("behavior_logprobs")
    data = hf_utils.write_jsonl(root / "data.jsonl", recs)
    return model_dir, data


def _opts(**kw):
    return {"tokenizer": hf_utils.tokenizer(), "shard_size": 2, "progress": False, "append_eos": False, **kw}


def test_collection_stores_processed_logprobs(setup, tmp_path):
    model_dir, data = setup
    out = tmp_path / "o"
    # the tiny data was not sampled from this teacher: some tokens fall outside the top 40
    collect_behavior_logprobs(model_dir, data, str(out), **_opts(temperature=0.9, top_k=40, on_excluded="flag"))
    teacher = hf_utils.model(seed=3).eval()
    for row in read_collected(str(out)):
        ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
        with torch.no_grad():
            logits = teacher(input_ids=ids).logits[0].double()
        P = len(row["prompt_ids"])
        for j, t in enumerate(row["response_ids"]):
            want = _loop(logits[P - 1 + j].tolist(), t, 0.9, 40, 1.0, 0.0)
            if want == float("-inf"):
                assert row["behavior_logprobs"][j] == float("-inf")
            else:
                assert row["behavior_logprobs"][j] == pytest.approx(want, abs=2e-5)


def test_tokens_outside_the_kept_set_are_refused_or_flagged(setup, tmp_path):
    model_dir, data = setup
    with pytest.raises(ValueError, match="outside the kept set"):
        collect_behavior_logprobs(model_dir, data, str(tmp_path / "a"), **_opts(top_k=1))
    res = collect_behavior_logprobs(model_dir, data, str(tmp_path / "b"), **_opts(top_k=1, on_excluded="flag"))
    assert res.excluded_tokens > 0
    rows = read_collected(str(tmp_path / "b"))
    assert sum(v == float("-inf") for r in rows for v in r["behavior_logprobs"]) == res.excluded_tokens


def test_sampling_settings_are_part_of_the_fingerprint(setup, tmp_path):
    model_dir, data = setup
    out = tmp_path / "o"
    collect_behavior_logprobs(model_dir, data, str(out), **_opts(top_p=0.95, max_new_shards=1, on_excluded="flag"))
    with pytest.raises(ValueError, match="top_p"):
        collect_behavior_logprobs(model_dir, data, str(out), **_opts(top_p=0.9, on_excluded="flag"))


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(top_k=-1), dict(min_p=1.0), dict(temperature=0.0)])
def test_bad_sampling_settings_are_named(bad):
    with pytest.raises(ValueError, match=list(bad)[0]):
        SamplingSettings(**bad)


def test_ingestion_records_the_mode_and_refuses_a_mix():
    from pear_kernels.transformers import ingest_generation_logprobs
    from pear_kernels.transformers.data import DataFormatError

    def rec(mode):
        r = {"prompt_token_ids": [1, 2], "outputs": [{"token_ids": [5, 6], "logprobs": [-0.1, -0.2]}]}
        if mode:
            r["logprobs_mode"] = mode
        return r

    rows = ingest_generation_logprobs([rec("processed_logprobs"), rec(None)])
    assert {r["behavior_logprobs_mode"] for r in rows} == {"processed"}
    with pytest.raises(DataFormatError, match="cannot be mixed"):
        ingest_generation_logprobs([rec("processed_logprobs"), rec("raw_logprobs")])
    with pytest.raises(DataFormatError, match="cannot be mixed"):
        ingest_generation_logprobs([rec("raw")], logprobs_mode="processed")
    assert ingest_generation_logprobs([rec(None)])[0]["behavior_logprobs_mode"] == "unknown"


def test_top_k_teacher_distribution_is_stored(setup, tmp_path):
    """collect --top-k K stores the teacher's K most likely ids and log-probs per response
    position (processed distribution), beside the sampled token's log-prob, in Parquet."""
    model_dir, data = setup
    out = tmp_path / "o"
    collect_behavior_logprobs(model_dir, data, str(out), **_opts(temperature=0.8, top_k_store=4))
    teacher = hf_utils.model(seed=3).eval()
    for row in read_collected(str(out)):
        assert len(row["teacher_ids"]) == len(row["response_ids"]) and len(row["teacher_ids"][0]) == 4
        ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(teacher(input_ids=ids).logits[0].double() / 0.8, -1)
        P = len(row["prompt_ids"])
        for j in range(len(row["response_ids"])):
            top = torch.topk(logp[P - 1 + j], 4)
            assert row["teacher_ids"][j] == top.indices.tolist()
            assert row["teacher_logprobs"][j] == pytest.approx(top.values.tolist(), abs=2e-5)
            assert row["behavior_logprobs"][j] == pytest.approx(float(logp[P - 1 + j, row["response_ids"][j]]), abs=2e-5)


def test_ingest_vllm_top_k_lists():
    from pear_kernels.transformers import ingest_generation_logprobs
    from pear_kernels.transformers.data import DataFormatError

    rec = {"prompt_token_ids": [1, 2], "logprobs_mode": "processed_logprobs", "outputs": [{
        "token_ids": [5, 6],
        "logprobs": [{"5": {"logprob": -0.2}, "9": {"logprob": -1.9}, "3": {"logprob": -3.0}},
                     {"7": -0.1, "6": -2.5, "8": -4.0}],
    }]}
    row = ingest_generation_logprobs([rec], top_k=2)[0]
    assert row["teacher_ids"] == [[5, 9], [7, 6]]
    assert row["teacher_logprobs"] == [[-0.2, -1.9], [-0.1, -2.5]]
    assert row["behavior_logprobs"] == [-0.2, -2.5]
    with pytest.raises(DataFormatError, match="fewer than top_k=4"):
        ingest_generation_logprobs([rec], top_k=4)
