"""Data loading: alignment of behavior log-probs with input_ids, refusals, bad files, the collator."""

from __future__ import annotations

import json

import pytest

from pear_kernels.transformers import MisalignedExampleError, PEARDataCollator, load_pear_dataset
from pear_kernels.transformers.data import DataFormatError

from . import hf_utils


def test_text_records_are_aligned_with_input_ids():
    tok = hf_utils.tokenizer()
    recs = hf_utils.text_records(3)
    ds = load_pear_dataset(recs, tok)
    assert len(ds) == 3 and ds.num_skipped == 0
    for rec, ex in zip(recs, ds):
        prompt_ids = tok(rec["prompt"])["input_ids"]
        P = len(prompt_ids)
        assert prompt_ids[0] == tok.bos_token_id
        assert ex["input_ids"] == prompt_ids + rec["behavior_token_ids"]
        assert ex["labels"] == [-100] * P + rec["behavior_token_ids"]
        assert ex["behavior_logprobs"][:P] == [0.0] * P
        assert ex["behavior_logprobs"][P:] == pytest.approx(rec["behavior_logprobs"])
        assert len(ex["attention_mask"]) == len(ex["input_ids"])


def test_chat_and_token_id_records():
    tok = hf_utils.tokenizer()
    msgs = [{"role": "user", "content": "what is one plus two ?"}, {"role": "assistant", "content": "three ."}]
    prompt_ids = tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
    full = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    resp = full[len(prompt_ids):]
    chat = {"messages": msgs, "behavior_token_ids": resp, "behavior_logprobs": [-0.1] * len(resp)}
    # ids form with log-probs over the whole sequence (prompt entries null)
    ids = {"prompt_ids": [2, 10, 11], "response_ids": [12, 13], "behavior_token_ids": [2, 10, 11, 12, 13],
           "behavior_logprobs": [None, None, None, -0.5, -0.25]}
    ds = load_pear_dataset([chat, ids], tok)
    assert ds[0]["input_ids"] == full and ds[0]["labels"][len(prompt_ids):] == resp
    assert ds[1]["input_ids"] == [2, 10, 11, 12, 13]
    assert ds[1]["labels"] == [-100, -100, -100, 12, 13]
    assert ds[1]["behavior_logprobs"] == [0.0, 0.0, 0.0, -0.5, -0.25]
    # ids form without behavior_token_ids: the log-probs belong to response_ids
    ds = load_pear_dataset([{"prompt_ids": [2, 10], "response_ids": [12], "behavior_logprobs": [-1.0]}])
    assert ds[0]["behavior_logprobs"] == [0.0, 0.0, -1.0]


def test_misaligned_examples_are_refused_with_index_and_position():
    tok = hf_utils.tokenizer()
    recs = hf_utils.text_records(4)
    P = len(tok(recs[2]["prompt"])["input_ids"])
    bad = dict(recs[2])
    bad["behavior_token_ids"] = [tok.bos_token_id] + bad["behavior_token_ids"][:-1]  # off by one
    bad["behavior_logprobs"] = bad["behavior_logprobs"]
    recs[2] = bad
    with pytest.raises(MisalignedExampleError, match=rf"example 2 \(record 2\).*input position {P}") as err:
        load_pear_dataset(recs, tok)
    assert err.value.index == 2 and err.value.position == P
    ds = load_pear_dataset(recs, tok, skip_misaligned=True)
    assert len(ds) == 3 and ds.num_skipped == 1 and ds.skipped[0][0] == 2
    # a changed id in the middle is located exactly
    recs = hf_utils.text_records(1)
    recs[0]["behavior_token_ids"][5] += 1
    with pytest.raises(MisalignedExampleError) as err:
        load_pear_dataset(recs, tok)
    assert err.value.position == len(tok(recs[0]["prompt"])["input_ids"]) + 5
    # too few ids (e.g. an EOS the tokenization adds)
    recs = hf_utils.text_records(1)
    with pytest.raises(MisalignedExampleError, match="tokenization has"):
        load_pear_dataset(recs, tok, append_eos=True)


def test_bad_values_and_missing_fields():
    tok = hf_utils.tokenizer()
    rec = hf_utils.text_records(1)[0]
    with pytest.raises(DataFormatError, match="must be a log-probability"):
        load_pear_dataset([{**rec, "behavior_logprobs": [0.5] * len(rec["behavior_token_ids"])}], tok)
    with pytest.raises(DataFormatError, match="has 2 entries"):
        load_pear_dataset([{**rec, "behavior_logprobs": [-1.0, -1.0]}], tok)
    with pytest.raises(DataFormatError, match="need 'behavior_token_ids'"):
        load_pear_dataset([{k: v for k, v in rec.items() if k != "behavior_token_ids"}], tok)
    with pytest.raises(DataFormatError, match="needs a tokenizer"):
        load_pear_dataset([rec])


def test_truncated_jsonl_names_file_and_line(tmp_path):
    path = hf_utils.write_jsonl(tmp_path / "d.jsonl", hf_utils.text_records(3))
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text[: len(text) - 25])  # cut inside the last record
    with pytest.raises(DataFormatError, match=r"d\.jsonl:3: invalid JSON.*truncated"):
        load_pear_dataset(path, hf_utils.tokenizer())


def test_wrong_types_name_file_line_and_field(tmp_path):
    recs = hf_utils.text_records(3)
    recs[1]["behavior_logprobs"] = "oops"
    path = hf_utils.write_jsonl(tmp_path / "d.jsonl", recs)
    with pytest.raises(DataFormatError, match=r"d\.jsonl:2: field 'behavior_logprobs' must be a list of numbers"):
        load_pear_dataset(path, hf_utils.tokenizer())
    recs = hf_utils.text_records(2)
    recs[1]["behavior_token_ids"] = [1.5, 2]
    path = hf_utils.write_jsonl(tmp_path / "e.jsonl", recs)
    with pytest.raises(DataFormatError, match=r"e\.jsonl:2: field 'behavior_token_ids'"):
        load_pear_dataset(path, hf_utils.tokenizer())
    (tmp_path / "f.jsonl").write_text(json.dumps(hf_utils.text_records(1)[0]) + "\n[1, 2]\n")
    with pytest.raises(DataFormatError, match=r"f\.jsonl:2: a record must be a JSON object"):
        load_pear_dataset(tmp_path / "f.jsonl", hf_utils.tokenizer())


def test_parquet_round_trip_and_bad_parquet(tmp_path):
    tok = hf_utils.tokenizer()
    recs = hf_utils.text_records(3)
    path = hf_utils.write_parquet(tmp_path / "d.parquet", recs)
    from_parquet = load_pear_dataset(path, tok)
    from_jsonl = load_pear_dataset(hf_utils.write_jsonl(tmp_path / "d.jsonl", recs), tok)
    assert from_parquet.examples == from_jsonl.examples
    bad = [dict(r, behavior_logprobs=[str(x) for x in r["behavior_logprobs"]]) for r in recs]
    path = hf_utils.write_parquet(tmp_path / "bad.parquet", bad)
    with pytest.raises(DataFormatError, match=r"bad\.parquet: column 'behavior_logprobs' must be a list of numbers"):
        load_pear_dataset(path, tok)
    data = open(tmp_path / "d.parquet", "rb").read()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match=r"cut\.parquet: not a readable Parquet file"):
        load_pear_dataset(tmp_path / "cut.parquet", tok)
    # a value-level error inside a Parquet file names its row
    recs[1]["behavior_logprobs"] = [0.9] * len(recs[1]["behavior_logprobs"])
    path = hf_utils.write_parquet(tmp_path / "v.parquet", recs)
    with pytest.raises(DataFormatError, match=r"v\.parquet: row 2: behavior_logprobs"):
        load_pear_dataset(path, tok)


def test_max_length_truncates_all_columns_together():
    tok = hf_utils.tokenizer()
    recs = hf_utils.text_records(2)
    ds = load_pear_dataset(recs, tok, max_length=12)
    full = load_pear_dataset(recs, tok)
    for a, b in zip(ds, full):
        for k in a:
            assert a[k] == b[k][:12]
    ds = load_pear_dataset(recs, tok, max_length=4)  # prompt only: nothing supervised is left
    assert len(ds) == 0 and ds.num_skipped == 2


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_keeps_behavior_aligned_through_padding(side):
    tok = hf_utils.tokenizer()
    ds = load_pear_dataset(hf_utils.text_records(3), tok)
    batch = PEARDataCollator(pad_token_id=tok.pad_token_id, padding_side=side, pad_to_multiple_of=8)(list(ds))
    assert batch["input_ids"].shape[1] % 8 == 0
    for b, ex in enumerate(ds):
        keep = batch["attention_mask"][b].bool()
        assert batch["input_ids"][b][keep].tolist() == ex["input_ids"]
        assert batch["labels"][b][keep].tolist() == ex["labels"]
        assert batch["behavior_logprobs"][b][keep].tolist() == pytest.approx(ex["behavior_logprobs"])
        assert (batch["labels"][b][~keep] == -100).all()
    packed = PEARDataCollator(pad_token_id=tok.pad_token_id, padding_free=True)(list(ds))
    starts = (packed["position_ids"][0] == 0).nonzero().reshape(-1).tolist()
    assert starts == [0, len(ds[0]["input_ids"]), len(ds[0]["input_ids"]) + len(ds[1]["input_ids"])]
    assert (packed["labels"][0, starts] == -100).all()
    with pytest.raises(ValueError, match="example 1 of the batch: behavior_logprobs has"):
        PEARDataCollator()([ds[0], dict(ds[1], behavior_logprobs=ds[1]["behavior_logprobs"][:-1])])
    with pytest.raises(KeyError, match="lacks"):
        PEARDataCollator()([{"input_ids": [1, 2], "labels": [1, 2]}])


def test_cli_validate(tmp_path, capsys):
    from pear_kernels.cli import main

    tok_dir = tmp_path / "tok"
    hf_utils.tokenizer().save_pretrained(tok_dir)
    recs = hf_utils.text_records(3)
    recs[0]["behavior_token_ids"] = recs[0]["behavior_token_ids"][1:] + [4]
    path = hf_utils.write_jsonl(tmp_path / "d.jsonl", recs)
    assert main(["validate", path, "--tokenizer", str(tok_dir)]) == 1
    assert "example 0" in capsys.readouterr().err
    assert main(["validate", path, "--tokenizer", str(tok_dir), "--skip-misaligned"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 2 and report["skipped"] == 1 and report["supervised_tokens"] > 0


def test_load_pear_dataset_is_a_datasets_dataset_and_streams(tmp_path):
    datasets = pytest.importorskip("datasets")
    tok = hf_utils.tokenizer()
    recs = hf_utils.text_records(6)
    bad = dict(recs[2], behavior_token_ids=list(reversed(recs[2]["behavior_token_ids"])))
    recs[2] = bad  # misaligned: skipped and counted
    path = hf_utils.write_jsonl(tmp_path / "d.jsonl", recs)
    ds = load_pear_dataset(path, tok, skip_misaligned=True)
    assert isinstance(ds, datasets.Dataset) and len(ds) == 5 and ds.num_skipped == 1 and ds.skipped[0][0] == 2
    assert {"input_ids", "labels", "behavior_logprobs", "attention_mask"} <= set(ds.column_names)
    stream = load_pear_dataset(path, tok, skip_misaligned=True, streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert list(stream) == ds.to_list()
    # the messages keep file and line
    with pytest.raises(Exception, match=r"d\.jsonl:3"):
        load_pear_dataset(path, tok)


def test_num_proc_gives_the_same_dataset_and_the_same_first_error(tmp_path):
    """Worker processes (spawned) build the same examples in the same order; skipped examples
    keep their input index; the first misaligned example in input order raises with its file
    and line, as with one process."""
    tok = hf_utils.tokenizer()
    recs = hf_utils.text_records(11, seed=3)
    for i in (4, 9):  # misaligned: reversed ids
        recs[i] = dict(recs[i], behavior_token_ids=list(reversed(recs[i]["behavior_token_ids"])))
    path = hf_utils.write_jsonl(tmp_path / "d.jsonl", recs)
    one = load_pear_dataset(path, tok, skip_misaligned=True)
    two = load_pear_dataset(path, tok, skip_misaligned=True, num_proc=2)
    assert two.to_list() == one.to_list() and len(two) == 9
    assert [s[:2] for s in two.skipped] == [s[:2] for s in one.skipped] == [(4, f"{path}:5"), (9, f"{path}:10")]
    with pytest.raises(MisalignedExampleError, match=r"example 4 \(.*d\.jsonl:5\)") as err:
        load_pear_dataset(path, tok, num_proc=2)
    assert err.value.index == 4
    with pytest.raises(ValueError, match="num_proc"):
        load_pear_dataset(path, tok, num_proc=0)
    with pytest.raises(ValueError, match="num_proc.*streaming"):
        load_pear_dataset(path, tok, num_proc=2, streaming=True)
