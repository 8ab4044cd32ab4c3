"""Behavior log-prob collection: values, round trip, interruption and resume, generation-time ingestion."""

from __future__ import annotations

import json
import os

import pytest

from pear_kernels.transformers import collect as collect_mod
from pear_kernels.transformers import (
    collect_behavior_logprobs,
    ingest_generation_logprobs,
    load_pear_dataset,
    read_collected,
)
from pear_kernels.transformers.data import DataFormatError, MisalignedExampleError

from . import hf_utils


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("collect")
    model_dir = hf_utils.save_model_dir(root / "teacher", seed=3)
    recs = hf_utils.text_records(7)
    for r in recs:  # collection ignores (and replaces) stored behavior fields
        r.pop("behavior_logprobs")
        r["id"] = f"ex{len(r['prompt'])}"
    data = hf_utils.write_jsonl(root / "data.jsonl", recs)
    return root, model_dir, data, recs


def _opts(**kw):
    # JSONL shards here: several tests edit shard files as text (Parquet shards: test_collect_parquet)
    return {"tokenizer": hf_utils.tokenizer(), "shard_size": 2, "max_tokens_per_batch": 64, "progress": False,
            "shard_format": "jsonl", **kw}


def test_round_trip_matches_full_logits(setup, tmp_path):
    root, model_dir, data, recs = setup
    out = tmp_path / "out"
    res = collect_behavior_logprobs(model_dir, data, str(out), **_opts())
    assert res.complete and res.num_examples == 7 and res.shards_total == 4 and res.shards_written == 4
    rows = read_collected(str(out))
    assert [r["index"] for r in rows] == list(range(7))
    teacher = hf_utils.model(seed=3).eval()
    tok = hf_utils.tokenizer()
    for rec, row in zip(recs, rows):
        assert row["id"] == rec["id"] and row["prompt"] == rec["prompt"]
        assert row["prompt_ids"] == tok(rec["prompt"])["input_ids"]
        # EOS is appended by default (as TRL does), so the student learns to stop
        assert row["behavior_token_ids"] == tok(rec["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ref = hf_utils.reference_response_logprobs(teacher, row["prompt_ids"], row["response_ids"])
        assert row["behavior_logprobs"] == pytest.approx(ref, abs=2e-5)
    # the directory loads straight into training examples, aligned
    ds = load_pear_dataset(str(out), tok)
    assert len(ds) == 7
    P = len(rows[0]["prompt_ids"])
    assert ds[0]["behavior_logprobs"][P:] == pytest.approx(rows[0]["behavior_logprobs"])
    # the text itself re-tokenizes to the stored ids
    text_only = [{k: v for k, v in r.items() if k not in ("prompt_ids", "response_ids")} for r in rows]
    assert load_pear_dataset(text_only, tok).examples == ds.examples


def test_interruption_and_resume_lose_and_duplicate_nothing(setup, tmp_path, monkeypatch):
    root, model_dir, data, _ = setup
    one_shot = tmp_path / "one"
    collect_behavior_logprobs(model_dir, data, str(one_shot), **_opts())
    out = tmp_path / "out"
    # stopped after one shard (a time-boxed job)
    res = collect_behavior_logprobs(model_dir, data, str(out), **_opts(max_new_shards=1))
    assert not res.complete and res.shards_written == 1
    with pytest.raises(DataFormatError, match="incomplete"):
        read_collected(str(out))
    assert len(read_collected(str(out), allow_incomplete=True)) == 2
    # crash in the middle of the next shard, leaving a stray temporary file behind
    (out / "shard-00001.jsonl.abc.tmp").write_text('{"partial": ')
    calls = {"n": 0}
    real_score = collect_mod._score

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_score(*args, **kwargs)

    monkeypatch.setattr(collect_mod, "_score", flaky)
    with pytest.raises(KeyboardInterrupt):
        collect_behavior_logprobs(model_dir, data, str(out), **_opts(max_tokens_per_batch=8))
    monkeypatch.setattr(collect_mod, "_score", real_score)
    # the stray temporary file was removed, the interrupted shard left nothing behind
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-00000.jsonl"]
    (out / "shard-00003.jsonl.xyz.tmp").write_text('{"partial": ')
    res = collect_behavior_logprobs(model_dir, data, str(out), **_opts())
    assert res.complete and res.shards_reused == 1 and res.shards_written == 3
    assert not any(n.endswith(".tmp") for n in os.listdir(out))
    assert read_collected(str(out)) == read_collected(str(one_shot))
    # a damaged complete shard is detected on reading and recomputed, not trusted
    shard = out / "shard-00002.jsonl"
    shard.write_text(shard.read_text().splitlines()[0] + "\n")  # lose a row
    with pytest.raises(DataFormatError, match="do not match"):
        read_collected(str(out))
    res = collect_behavior_logprobs(model_dir, data, str(out), **_opts())
    assert res.shards_written == 1 and res.shards_reused == 3
    assert read_collected(str(out)) == read_collected(str(one_shot))


def test_refuses_to_mix_collections(setup, tmp_path):
    root, model_dir, data, recs = setup
    out = tmp_path / "out"
    collect_behavior_logprobs(model_dir, data, str(out), **_opts())
    other = hf_utils.write_jsonl(tmp_path / "other.jsonl", recs[:3])
    with pytest.raises(ValueError, match="different inputs"):
        collect_behavior_logprobs(model_dir, other, str(out), **_opts())
    with pytest.raises(ValueError, match="different temperature"):
        collect_behavior_logprobs(model_dir, data, str(out), **_opts(temperature=0.7))
    res = collect_behavior_logprobs(model_dir, other, str(out), **_opts(overwrite=True))
    assert res.complete and len(read_collected(str(out))) == 3


def test_cli_collect_and_merge(setup, tmp_path, capsys):
    from pear_kernels.cli import main

    root, model_dir, data, _ = setup
    out, merged = tmp_path / "out", tmp_path / "merged.jsonl"
    tok_dir = hf_utils.save_tokenizer_dir(tmp_path / "tok")
    rc = main(["collect", "--model", model_dir, "--tokenizer", tok_dir, "--data", data, "--output", str(out),
               "--shard-size", "3", "--shard-format", "jsonl",
               "--no-progress", "--merge-to", str(merged), "--device", "cpu"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["complete"] is True
    rows = [json.loads(line) for line in merged.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(7))
    # a missing model directory is a file system error (exit code 4, see --help)
    assert main(["collect", "--model", str(tmp_path / "nope"), "--tokenizer", tok_dir, "--data", data,
                 "--output", str(out)]) == 4


def test_ingest_vllm_style_logprobs(tmp_path):
    tok = hf_utils.tokenizer()
    rec = hf_utils.text_records(1)[0]
    ids, lps = rec["behavior_token_ids"], rec["behavior_logprobs"]
    prompt_ids = tok(rec["prompt"])["input_ids"]
    vllm = {
        "prompt": rec["prompt"],
        "prompt_token_ids": prompt_ids,
        "outputs": [
            {"text": rec["response"], "token_ids": ids,
             "logprobs": [{str(t): {"logprob": lp, "rank": 1}, "3": {"logprob": -9.0}} for t, lp in zip(ids, lps)]},
            {"text": rec["response"], "token_ids": ids, "logprobs": lps},
        ],
    }
    path = hf_utils.write_jsonl(tmp_path / "gen.jsonl", [vllm])
    out = tmp_path / "ingested.jsonl"
    records = ingest_generation_logprobs(path, str(out))
    assert len(records) == 2 and records[0]["behavior_logprobs"] == pytest.approx(lps)
    from pear_kernels.cli import main

    assert main(["ingest-vllm", "--input", path, "--output", str(tmp_path / "cli.jsonl")]) == 0
    assert (tmp_path / "cli.jsonl").read_text() == out.read_text()
    ds = load_pear_dataset(str(out), tok)
    P = len(prompt_ids)
    assert ds[0]["input_ids"] == prompt_ids + ids and ds[0]["behavior_logprobs"][P:] == pytest.approx(lps)
    # text-only prompt: the loader checks the recorded ids against the tokenization
    text_only = {"prompt": rec["prompt"], "outputs": [{"text": rec["response"], "token_ids": ids, "logprobs": lps}]}
    assert load_pear_dataset(ingest_generation_logprobs([text_only]), tok).examples == ds.examples[:1]
    wrong = {"prompt": rec["prompt"], "outputs": [{"text": rec["response"], "token_ids": ids[1:] + [5],
                                                    "logprobs": lps}]}
    with pytest.raises(MisalignedExampleError):
        load_pear_dataset(ingest_generation_logprobs([wrong]), tok)
    # the recorded dict must contain the sampled token
    bad = dict(vllm, outputs=[dict(vllm["outputs"][0], token_ids=[ids[0] + 1] + ids[1:])])
    with pytest.raises(DataFormatError, match=r"output 0: logprobs\[0\] has no entry for the generated token"):
        ingest_generation_logprobs([bad])
    with pytest.raises(DataFormatError, match="logprobs entries for"):
        ingest_generation_logprobs([dict(vllm, outputs=[dict(vllm["outputs"][1], logprobs=lps[:-1])])])


def test_plan_sorts_by_length_and_batches_respect_the_token_budget():
    items = [(i, "", {}, [1] * 2, [1] * n) for i, n in enumerate([3, 9, 1, 9, 5, 7])]
    plan = collect_mod._plan(items, shard_size=4)
    assert plan == [[1, 3, 5, 4], [0, 2]]  # longest first, ties by index
    lengths = [len(it[3]) + len(it[4]) for it in items]
    batches = list(collect_mod._batches(plan[0], lengths, max_tokens=24, max_batch=None))
    assert batches == [[1, 3], [5, 4]]
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 24
    assert list(collect_mod._batches(plan[0], lengths, 10**6, max_batch=3)) == [[1, 3, 5], [4]]


def test_collect_reads_parquet_like_jsonl(setup, tmp_path):
    root, model_dir, data, recs = setup
    pq_path = hf_utils.write_parquet(tmp_path / "data.parquet", recs)
    collect_behavior_logprobs(model_dir, pq_path, str(tmp_path / "a"), **_opts())
    collect_behavior_logprobs(model_dir, data, str(tmp_path / "b"), **_opts())
    a, b = read_collected(str(tmp_path / "a")), read_collected(str(tmp_path / "b"))
    assert [r["behavior_logprobs"] for r in a] == [r["behavior_logprobs"] for r in b]
