"""Parquet collection shards: typed columns, read back by read_collected, load_pear_dataset and
datasets.load_dataset("parquet") directly; resume and damage detection as with JSONL."""

from __future__ import annotations

import glob
import os

import pytest

pytest.importorskip("pyarrow")

from pear_kernels.transformers import collect_behavior_logprobs, load_pear_dataset, read_collected  # noqa: E402
from pear_kernels.transformers.data import DataFormatError  # noqa: E402

from . import hf_utils  # noqa: E402


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    root = tmp_path_factory.mktemp("pq")
    model_dir = hf_utils.save_model_dir(root / "teacher", seed=3)
    recs = hf_utils.text_records(5)
    for i, r in enumerate(recs):
        r.pop("behavior_logprobs")
        r["id"] = f"ex{i}"
    data = hf_utils.write_jsonl(root / "data.jsonl", recs)
    opts = dict(tokenizer=hf_utils.tokenizer(), shard_size=2, progress=False)
    out_pq, out_js = root / "pq", root / "js"
    collect_behavior_logprobs(model_dir, data, str(out_pq), **opts)
    collect_behavior_logprobs(model_dir, data, str(out_js), shard_format="jsonl", **opts)
    return model_dir, data, out_pq, out_js, opts


def test_parquet_shards_have_typed_columns(collected):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, _, out, _, _ = collected
    files = sorted(glob.glob(str(out / "shard-*.parquet")))
    assert len(files) == 3
    schema = pq.read_schema(files[0])
    assert schema.field("behavior_token_ids").type == pa.list_(pa.int32())
    assert schema.field("behavior_logprobs").type == pa.list_(pa.float32())


def test_parquet_equals_jsonl_within_float32(collected):
    _, _, out_pq, out_js, _ = collected
    a, b = read_collected(str(out_pq)), read_collected(str(out_js))
    assert [r["behavior_token_ids"] for r in a] == [r["behavior_token_ids"] for r in b]
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["behavior_logprobs"] == pytest.approx(rb["behavior_logprobs"], rel=1e-6, abs=1e-6)
    tok = hf_utils.tokenizer()
    assert len(load_pear_dataset(str(out_pq), tok)) == 5


def test_datasets_reads_a_finished_collection_directly(collected):
    datasets = pytest.importorskip("datasets")
    _, _, out, _, _ = collected
    ds = datasets.load_dataset("parquet", data_files=str(out / "shard-*.parquet"), split="train")
    assert len(ds) == 5
    assert sorted(ds["index"]) == list(range(5))
    assert {"prompt_ids", "response_ids", "behavior_token_ids", "behavior_logprobs"} <= set(ds.column_names)


def test_storage_per_token_is_smaller_than_jsonl(collected):
    _, _, out_pq, out_js, _ = collected
    tokens = sum(len(r["behavior_token_ids"]) for r in read_collected(str(out_pq)))
    pq_bytes = sum(os.path.getsize(f) for f in glob.glob(str(out_pq / "shard-*.parquet")))
    js_bytes = sum(os.path.getsize(f) for f in glob.glob(str(out_js / "shard-*.jsonl")))
    print(f"\nbytes per token: parquet {pq_bytes / tokens:.1f}, jsonl {js_bytes / tokens:.1f}")
    assert tokens > 0 and js_bytes > 0


def test_damaged_parquet_shard_is_recomputed(collected, tmp_path):
    import shutil

    model_dir, data, out, _, opts = collected
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "shard-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataFormatError, match="not a readable Parquet shard"):
        read_collected(str(copy))
    res = collect_behavior_logprobs(model_dir, data, str(copy), **opts)
    assert res.shards_written == 1 and res.shards_reused == 2
    assert read_collected(str(copy)) == read_collected(str(out))
