"""Reading PEAR data: the record format, its file readers, and a ``collect`` output directory.

Holds what reading needs and nothing that tokenizes, scores or writes, so that data.py (building
examples) and collect.py (writing collections) both import it and neither imports the other:

- ``DataFormatError`` and the per-record type checks (``_check_record``);
- the readers of JSONL and Parquet files (``read_records``, ``_decode_json_line``) and of any
  source ``load_pear_dataset`` or ``collect`` accept (``iter_source``: paths, a collection
  directory, in-memory records);
- the on-disk layout of a collection (manifest, shard names and formats, the fields of a
  collected row) and its validating reader ``read_collected``.

The fields of a record are described in data.py. Every error names the file and the line (or
row) it comes from.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from ..checks import BEHAVIOR_LOGPROB_TOLERANCE

__all__ = [
    "DataFormatError",
    "FORMAT_VERSION",
    "MANIFEST",
    "SHARD_FORMATS",
    "iter_source",
    "read_collected",
    "read_records",
]

PathLike = Union[str, "os.PathLike[str]"]

class DataFormatError(ValueError):
    """A record or a file that does not follow the format; the message names file and line."""


# ----------------------------------------------------------------------------- reading files


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_record(rec: Any, where: str) -> None:
    """Field types of one record; errors name the location and the field."""
    if not isinstance(rec, dict):
        raise DataFormatError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")

    def need(name, ok, what):
        if name in rec and rec[name] is not None and not ok(rec[name]):
            raise DataFormatError(f"{where}: field {name!r} must be {what}, got {_short(rec[name])}")

    def int_list(v):
        return isinstance(v, list) and all(_is_int(x) for x in v)

    need("prompt", lambda v: isinstance(v, str), "a string")
    need("response", lambda v: isinstance(v, str), "a string")
    need("prompt_ids", int_list, "a list of integers")
    need("response_ids", int_list, "a list of integers")
    need("behavior_token_ids", int_list, "a list of integers")
    need("behavior_logprobs", lambda v: isinstance(v, list) and all(x is None or _is_num(x) for x in v),
         "a list of numbers")
    need("messages", lambda v: isinstance(v, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in v
    ), "a list of {'role': str, 'content': str} objects")


def _short(v) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _decode_json_line(raw: bytes, where: str) -> Any:
    """One JSONL line: undecodable bytes, invalid or too deeply nested JSON name file and line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(
            f"{where}: undecodable bytes at column {exc.start + 1} (the file is not UTF-8 text)"
        ) from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        hint = " (the file looks truncated)" if not line.endswith("\n") else ""
        raise DataFormatError(f"{where}: invalid JSON: {exc.msg} at column {exc.colno}{hint}") from None
    except RecursionError:
        raise DataFormatError(f"{where}: JSON nested too deeply to read") from None


def _read_jsonl(path: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            rec = _decode_json_line(raw, where)
            _check_record(rec, where)
            yield where, rec


# Arrow types each known column may have; checked on the schema before any row is read.
def _arrow_checks():
    import pyarrow as pa

    def list_of(pred):
        return lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t)) and pred(t.value_type)

    def is_str(t):
        return pa.types.is_string(t) or pa.types.is_large_string(t)

    def is_num(t):
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)

    def is_msg(t):
        return pa.types.is_struct(t) and all(
            t.get_field_index(k) >= 0 and is_str(t.field(k).type) for k in ("role", "content")
        )

    return {
        "prompt": (is_str, "a string"),
        "response": (is_str, "a string"),
        "prompt_ids": (list_of(pa.types.is_integer), "a list of integers"),
        "response_ids": (list_of(pa.types.is_integer), "a list of integers"),
        "behavior_token_ids": (list_of(pa.types.is_integer), "a list of integers"),
        "behavior_logprobs": (list_of(is_num), "a list of numbers"),
        "messages": (list_of(is_msg), "a list of {role, content} structs"),
    }


def _read_parquet(path: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover
        raise ImportError("reading Parquet needs pyarrow: pip install pear_kernels[hf]") from exc
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataFormatError(f"{path}: not a readable Parquet file ({exc})") from None
    checks = _arrow_checks()
    for f in pf.schema_arrow:
        if f.name in checks:
            ok, what = checks[f.name]
            if not ok(f.type):
                raise DataFormatError(f"{path}: column {f.name!r} must be {what}, got Arrow type {f.type}")
    row = 0
    for i in range(pf.num_row_groups):
        try:
            batch = pf.read_row_group(i).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise DataFormatError(f"{path}: row group {i} (from row {row + 1}) is unreadable ({exc})") from None
        for rec in batch:
            row += 1
            where = f"{path}: row {row}"
            _check_record(rec, where)
            yield where, rec


def read_records(path: PathLike) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """Yield (location, record) from a .jsonl/.json lines or .parquet file, checking types."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such data file: {path}")
    if path.endswith(".parquet") or path.endswith(".pq"):
        yield from _read_parquet(path)
    elif path.endswith(".jsonl") or path.endswith(".json") or path.endswith(".ndjson"):
        yield from _read_jsonl(path)
    else:
        raise DataFormatError(f"{path}: unknown data file type (expected .jsonl or .parquet)")


def iter_source(source) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(location, record) from a path, a list of paths, a collect output dir, or in-memory records."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            for i, rec in enumerate(read_collected(path)):
                where = f"{path}: row {i + 1}"
                _check_record(rec, where)  # the same type checks as a JSONL row
                yield where, rec
        else:
            yield from read_records(path)
        return
    if isinstance(source, dict):
        raise TypeError("source must be a path, a list of paths, or an iterable of records, not one record")
    items = list(source)
    if items and all(isinstance(x, (str, os.PathLike)) for x in items):
        for p in items:
            yield from iter_source(p)
        return
    for i, rec in enumerate(items):
        where = f"record {i}"
        _check_record(rec, where)
        yield where, rec


# ----------------------------------------------------------------------------- collection directories

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Fields a collection (re)computes; stale values from the input are dropped. Every collected
# row has the first group; the second when the teacher's top-k was stored.
_OUTPUT_FIELDS = ("index", "prompt_ids", "response_ids", "behavior_token_ids", "behavior_logprobs")
_TOPK_FIELDS = ("teacher_ids", "teacher_logprobs")

# New collections write Parquet shards (token ids int32, log-probs float32: 8 bytes a token
# before compression, against ~42 bytes of JSON text); collections written as JSONL (before
# shard_format was recorded) are still read and resumed as JSONL.
SHARD_FORMATS = ("parquet", "jsonl")


def _shard_name(k: int, fmt: str = "parquet") -> str:
    return f"shard-{k:05d}.{fmt}"


def _shard_format(manifest: Dict[str, Any]) -> str:
    return manifest.get("shard_format", "jsonl")


def _read_manifest(output_dir: str) -> Dict[str, Any]:
    path = os.path.join(output_dir, MANIFEST)
    try:
        with open(path, "rb") as f:
            manifest = _decode_json_line(f.read(), path)
    except FileNotFoundError:
        raise DataFormatError(f"{output_dir}: no {MANIFEST}: not a collection directory") from None
    if not isinstance(manifest, dict):
        raise DataFormatError(f"{path}: a manifest must be a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataFormatError(f"{path}: unsupported format_version {manifest.get('format_version')!r}")
    shards, n = manifest.get("shards"), manifest.get("num_examples")
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
        raise DataFormatError(f"{path}: malformed manifest: 'num_examples' must be a non-negative integer")
    if not (isinstance(shards, list) and all(
        isinstance(m, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in m) for m in shards
    )):
        raise DataFormatError(f"{path}: malformed manifest: 'shards' must be a list of lists of example indices")
    return manifest


def _check_row(row: Dict[str, Any], where: str) -> None:
    for key in _OUTPUT_FIELDS:
        if key not in row:
            raise DataFormatError(f"{where}: collected row lacks {key!r}")
    r, ids, lp = row["response_ids"], row["behavior_token_ids"], row["behavior_logprobs"]
    if ids != r:
        raise DataFormatError(f"{where}: behavior_token_ids differ from response_ids")
    if len(lp) != len(r):
        raise DataFormatError(f"{where}: {len(lp)} log-probs for {len(r)} response tokens")
    for j, v in enumerate(lp):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v) or v > BEHAVIOR_LOGPROB_TOLERANCE:
            raise DataFormatError(f"{where}: behavior_logprobs[{j}] = {v!r} is not a log-probability")


def _read_shard(path: str, items_expected: Optional[List[int]] = None) -> List[Dict[str, Any]]:
    rows = []
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise DataFormatError(f"{path}: not a readable Parquet shard ({exc})") from None
        for i, row in enumerate(records, 1):
            _check_row(row, f"{path}: row {i}")
            rows.append(row)
    else:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                row = _decode_json_line(raw, where)
                if not isinstance(row, dict):
                    raise DataFormatError(f"{where}: a row must be a JSON object")
                _check_row(row, where)
                rows.append(row)
    if items_expected is not None and sorted(r["index"] for r in rows) != items_expected:
        raise DataFormatError(f"{path}: rows do not match the shard's planned examples")
    return rows


def read_collected(output_dir: str, *, allow_incomplete: bool = False) -> List[Dict[str, Any]]:
    """The rows of a collection in input order, validated (each index exactly once)."""
    manifest = _read_manifest(output_dir)
    if not manifest.get("complete") and not allow_incomplete:
        raise DataFormatError(
            f"{output_dir}: the collection is incomplete (interrupted?); rerun collect to finish it"
        )
    rows: Dict[int, Dict[str, Any]] = {}
    fmt = _shard_format(manifest)
    if fmt not in SHARD_FORMATS:
        raise DataFormatError(f"{output_dir}: unknown shard_format {fmt!r} in the manifest")
    for k, members in enumerate(manifest["shards"]):
        path = os.path.join(output_dir, _shard_name(k, fmt))
        if not os.path.exists(path):
            if allow_incomplete:
                continue
            raise DataFormatError(f"{path}: missing shard of a complete collection")
        for row in _read_shard(path, items_expected=sorted(members)):
            if row["index"] in rows:
                raise DataFormatError(f"{path}: example {row['index']} appears twice")
            rows[row["index"]] = row
    if not allow_incomplete and sorted(rows) != list(range(manifest["num_examples"])):
        missing = sorted(set(range(manifest["num_examples"])) - set(rows))
        raise DataFormatError(f"{output_dir}: examples {missing[:10]} are missing")
    return [rows[i] for i in sorted(rows)]
