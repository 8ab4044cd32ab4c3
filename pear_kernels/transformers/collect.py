"""Offline collection of behavior log-probs, and ingestion of log-probs recorded at generation.

``collect_behavior_logprobs`` runs a local causal LM (the behavior policy) over a data set and
stores log pi_beta of every response token next to the token ids it was computed on:

- the head goes through ``fused_token_logprobs`` (no (tokens x vocab) logits), read through the
  head module (see head.py);
- examples are sorted by length (longest first) so a batch pads little, and batched up to a
  token budget;
- the sorted order is cut into shards of ``shard_size`` examples; each shard is written to a
  temporary file and renamed into place (``os.replace`` is atomic on POSIX), so after an
  interruption a shard is either complete or absent. A rerun reuses the complete shards whose
  rows check out and computes the rest: no row is lost or written twice. The manifest records a
  fingerprint of the tokenized inputs, the model and the settings, and a rerun with different
  ones is refused instead of mixing two collections;
- ``read_collected`` (formats.py, re-exported here) checks the result when it is read back:
  every index exactly once, token ids equal to the stored response, log-probs finite and <= 0.

``ingest_generation_logprobs`` converts log-probs recorded by the sampler (vLLM-style: per
generated token, the sampled token's log-prob or a {token_id: logprob} dict that contains it)
into the same record format, checking that the recorded ids are the generated ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .. import fused_token_logprobs
from ..checks import BEHAVIOR_LOGPROB_TOLERANCE, IGNORE_INDEX
from .formats import (
    _OUTPUT_FIELDS,
    _TOPK_FIELDS,
    FORMAT_VERSION,
    MANIFEST,
    SHARD_FORMATS,
    DataFormatError,
    _read_manifest,
    _read_shard,
    _shard_format,
    _shard_name,
    iter_source,
    read_collected,
)
from .head import call_through_head
from .patch import backbone_of
from .sampling import SamplingSettings, processed_distribution
from .tokenizing import tokenize_record

__all__ = [
    "CollectResult",
    "collect_behavior_logprobs",
    "ingest_generation_logprobs",
    "read_collected",
]


@dataclass
class CollectResult:
    output_dir: str
    num_examples: int
    shards_total: int
    shards_written: int
    shards_reused: int
    complete: bool
    excluded_tokens: int = 0  # stored as -inf with on_excluded="flag" (this run)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (the directory entry itself is flushed)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the whole new one, never a part.

    The file gets the permissions of an ordinary new file (0666 less the umask; mkstemp alone
    would leave it 0600), and the directory is fsynced after the rename so that a crash cannot
    lose a shard that the manifest already counts.
    """
    _atomic_replace(path, lambda f: f.write(text.encode("utf-8")))


def _atomic_replace(path: str, write) -> None:
    """Write a temporary file in ``path``'s directory with ``write(binary file)``, fsync it,
    give it the umask's permissions, rename it over ``path`` and fsync the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


LOCK = ".collect.lock"


class CollectionLockedError(ValueError):
    """Another collector is writing into the same output directory."""


class _DirLock:
    """An exclusive lock file in the output directory (O_CREAT | O_EXCL), holding pid and host.

    A second collector refuses instead of deleting the first one's temporary shard or
    interleaving shards. A lock left by a process that no longer runs (same host) is stale and
    taken over; a lock from another host is never broken automatically.
    """

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK)
        self.held = False

    def __enter__(self):
        import socket

        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_umask())
            except FileExistsError:
                owner = self._owner()
                if owner.get("host") == me["host"] and not _pid_alive(owner.get("pid")):
                    os.unlink(self.path)  # stale: its process is gone
                    continue
                raise CollectionLockedError(
                    f"{os.path.dirname(self.path)} is being written by another collector "
                    f"(pid {owner.get('pid')} on {owner.get('host')}); wait for it, or, if no collector "
                    f"runs there, remove {self.path}"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise CollectionLockedError(f"could not take the lock {self.path}")

    def _owner(self) -> Dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                owner = json.load(f)
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}

    def __exit__(self, *exc):
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.held = False
        return False


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _write_parquet_shard(path: str, rows: List[Dict[str, Any]]) -> None:
    """Atomically write rows as Parquet: the id/log-prob columns with fixed Arrow types (so every
    shard has one schema and ``datasets.load_dataset("parquet", ...)`` reads them together),
    the record's other fields as pyarrow infers them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fixed = {
        "index": pa.int64(), "prompt_ids": pa.list_(pa.int32()), "response_ids": pa.list_(pa.int32()),
        "behavior_token_ids": pa.list_(pa.int32()), "behavior_logprobs": pa.list_(pa.float32()),
    }
    if rows and "teacher_ids" in rows[0]:
        fixed.update(teacher_ids=pa.list_(pa.list_(pa.int32())), teacher_logprobs=pa.list_(pa.list_(pa.float32())))
    columns = {name: pa.array([r[name] for r in rows], type=ty) for name, ty in fixed.items()}
    other = sorted({k for r in rows for k in r} - set(fixed))
    for name in other:
        columns[name] = pa.array([r.get(name) for r in rows])
    table = pa.table(columns)
    _atomic_replace(path, lambda f: pq.write_table(table, f))


def _load_model(model, tokenizer, device, dtype):
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = os.fspath(model)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model must be a local model directory, got {path!r}")
        kwargs = {"local_files_only": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if tokenizer is None:
            if not any(os.path.exists(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
                raise FileNotFoundError(
                    f"{path} has no tokenizer files; pass the tokenizer (--tokenizer DIR on the command line)"
                )
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        ident = os.path.abspath(path)
        model = loaded
    else:
        if dtype is not None:
            model = model.to(dtype)
        ident = None
    if device is not None:
        model = model.to(device)
    return model, tokenizer, ident


# Files whose bytes determine a model's outputs (weights and the architecture config).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def _model_digest(model, path: Optional[str]) -> str:
    """sha256 of what determines the model's log-probs: the weight files' bytes and
    config.json for a directory, the state dict's tensors for a model object. Re-saving other
    weights into the same directory changes it, as it must."""
    h = hashlib.sha256()
    if path is not None:
        names = sorted(n for n in os.listdir(path) if n.endswith(_WEIGHT_SUFFIXES) or n == "config.json")
        for name in names:
            h.update(name.encode() + b"\0")
            with open(os.path.join(path, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
        return h.hexdigest()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tokenizer_digest(tokenizer) -> Optional[str]:
    """sha256 of the vocabulary, the special tokens and the chat template."""
    if tokenizer is None:
        return None
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    specials = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    h.update(json.dumps(specials, sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def _identity(model, path, tokenizer, settings: Dict[str, Any]) -> Dict[str, Any]:
    """Everything that determines the stored log-probs, component by component, so that a
    refused resume can say what differs."""
    param = next(model.parameters(), None)
    return {
        "model weights": _model_digest(model, path),
        "dtype": str(param.dtype) if param is not None else None,
        "tokenizer": _tokenizer_digest(tokenizer),
        **settings,
    }


def _fingerprint(items, identity: Dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(identity, sort_keys=True).encode())
    for _, _, _, p, r in items:
        h.update(json.dumps([p, r]).encode())
    return h.hexdigest()


def _what_differs(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def _plan(items, shard_size: int) -> List[List[int]]:
    # longest first, ties by index: deterministic, so a rerun cuts the same shards
    order = sorted(range(len(items)), key=lambda i: (-(len(items[i][3]) + len(items[i][4])), i))
    return [order[k: k + shard_size] for k in range(0, len(order), shard_size)]


def _batches(positions: Sequence[int], lengths: Sequence[int], max_tokens: int, max_batch: Optional[int]):
    batch: List[int] = []
    longest = 0
    for i in positions:
        longest_if = max(longest, lengths[i])
        if batch and (longest_if * (len(batch) + 1) > max_tokens or (max_batch and len(batch) >= max_batch)):
            yield batch
            batch, longest_if = [], lengths[i]
        batch.append(i)
        longest = longest_if
    if batch:
        yield batch


# Rows of materialised logits per chunk when truncated sampling needs the whole distribution
_SAMPLING_CHUNK_ROWS = 256


@torch.no_grad()
def _score(model, pad_id: int, seqs: List[Tuple[List[int], List[int]]], sampling: SamplingSettings,
           top_k_store: int = 0):
    """Response log-probs of each (prompt_ids, response_ids) pair, one padded forward.

    Plain temperature sampling: the fused log-probs (no logits). Truncated sampling (top-k,
    top-p, min-p): the processed distribution, from logits materialised a chunk of rows at a
    time; a token outside the kept set gets -inf (the caller refuses or flags it).
    """
    device = next(model.parameters()).device
    lengths = [len(p) + len(r) for p, r in seqs]
    L = max(lengths)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    target = torch.full((len(seqs), L - 1), IGNORE_INDEX, dtype=torch.long)
    for b, (p, r) in enumerate(seqs):
        full = p + r
        ids[b, : len(full)] = torch.tensor(full)
        mask[b, : len(full)] = 1
        # hidden state i predicts token i + 1: the response tokens are targets of positions P-1 .. P+R-2
        target[b, len(p) - 1: len(full) - 1] = torch.tensor(r)
    ids, mask, target = ids.to(device), mask.to(device), target.to(device)
    backbone = backbone_of(model)
    hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1]
    if not sampling.truncates and not top_k_store:
        logp = call_through_head(
            model.get_output_embeddings(), hidden,
            lambda h, w, bias: fused_token_logprobs(h.to(w.dtype), w, target, bias=bias,
                                                    temperature=sampling.temperature),
        )
    else:
        def processed(h, w, bias):
            flat_h = h.reshape(-1, h.shape[-1]).to(w.dtype)
            flat_y = target.reshape(-1)
            rows = (flat_y != IGNORE_INDEX).nonzero().squeeze(1)
            out = torch.zeros(flat_y.shape, dtype=torch.float32, device=h.device)
            k_ids = torch.zeros(flat_y.shape + (max(top_k_store, 1),), dtype=torch.long, device=h.device)
            k_lp = torch.zeros(flat_y.shape + (max(top_k_store, 1),), dtype=torch.float32, device=h.device)
            for k in range(0, rows.numel(), _SAMPLING_CHUNK_ROWS):
                idx = rows[k: k + _SAMPLING_CHUNK_ROWS]
                z = flat_h[idx] @ w.t()
                if bias is not None:
                    z = z + bias
                dist = processed_distribution(z, sampling)
                out[idx] = dist.gather(1, flat_y[idx][:, None]).squeeze(1).float()
                if top_k_store:
                    top = torch.topk(dist, min(top_k_store, dist.shape[1]), dim=1)
                    k_ids[idx, : top.indices.shape[1]] = top.indices
                    k_lp[idx, : top.values.shape[1]] = top.values.float()
            return out.reshape(target.shape), k_ids.reshape(target.shape + (-1,)), k_lp.reshape(target.shape + (-1,))

        logp, top_ids, top_lp = call_through_head(model.get_output_embeddings(), hidden, processed)
    logp = logp.float().cpu()
    spans = [(len(p) - 1, len(p) + len(r) - 1) for p, r in seqs]
    logps = [logp[b, a:e].tolist() for b, (a, e) in enumerate(spans)]
    if not top_k_store:
        return logps
    top_ids, top_lp = top_ids.cpu(), top_lp.cpu()
    return (logps, [top_ids[b, a:e].tolist() for b, (a, e) in enumerate(spans)],
            [top_lp[b, a:e].tolist() for b, (a, e) in enumerate(spans)])


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="ex", desc="collect", dynamic_ncols=True)


def collect_behavior_logprobs(
    model,
    data,
    output_dir: str,
    *,
    tokenizer=None,
    max_tokens_per_batch: int = 8192,
    max_batch_size: Optional[int] = None,
    shard_size: int = 256,
    device=None,
    dtype: Optional[torch.dtype] = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    on_excluded: str = "error",
    shard_format: str = "parquet",
    top_k_store: int = 0,
    max_length: Optional[int] = None,
    add_special_tokens: bool = True,
    append_eos: bool = True,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    max_new_shards: Optional[int] = None,
) -> CollectResult:
    """Compute behavior log-probs of every response token of ``data`` with ``model``.

    Args:
        model: a local model directory (loaded with AutoModelForCausalLM, offline) or a model.
        data: JSONL/Parquet path(s) or records (see data.py; behavior fields are not needed).
        output_dir: where shards and the manifest go; read it back with ``read_collected`` or
            pass it to ``load_pear_dataset``.
        tokenizer: needed for text records; defaults to the model directory's tokenizer.
        max_tokens_per_batch: padded tokens per forward (batch size x longest sequence).
        shard_size: examples per atomically written shard (the unit of resumption).
        temperature, top_k, top_p, min_p: the sampling settings the behavior policy generated
            with; the stored log-probs are those of that processed distribution (renormalised
            over the kept set, see sampling.py), which is what the importance ratio needs.
        top_k_store: K > 0 also stores, per response position, the teacher's K most likely ids
            and their log-probs under the same processed distribution ("teacher_ids",
            "teacher_logprobs", aligned like behavior_logprobs) for fused_pear_distill_loss.
        shard_format: "parquet" (default: int32 ids, float32 log-probs, readable by
            ``datasets.load_dataset("parquet", data_files=DIR + "/shard-*.parquet")``) or "jsonl".
        on_excluded: a response token outside the sampler's kept set (probability 0 under these
            settings: the data was not sampled with them) is refused ("error", default, naming
            the example and position) or stored as -inf and counted ("flag").
        max_length: truncate prompt + response to this many tokens.
        append_eos: append the tokenizer's EOS to text responses (default, as TRL's SFT does,
            so the student learns to stop); part of the collection's fingerprint.
        resume: reuse complete shards of an earlier run with the same inputs and settings.
        overwrite: delete an earlier collection in ``output_dir`` first.
        max_new_shards: stop after writing this many shards (time-boxed jobs; rerun to go on).

    Returns a CollectResult; ``complete`` is False only when ``max_new_shards`` stopped it.
    """
    for name, v in (("max_tokens_per_batch", max_tokens_per_batch), ("shard_size", shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    sampling = SamplingSettings(float(temperature) if isinstance(temperature, (int, float)) else temperature,
                                top_k, top_p, min_p)
    if on_excluded not in ("error", "flag"):
        raise ValueError(f"on_excluded must be 'error' or 'flag', got {on_excluded!r}")
    if shard_format not in SHARD_FORMATS:
        raise ValueError(f"shard_format must be one of {SHARD_FORMATS}, got {shard_format!r}")
    if isinstance(top_k_store, bool) or not isinstance(top_k_store, int) or top_k_store < 0:
        raise ValueError(f"top_k_store must be an int >= 0, got {top_k_store!r}")
    model, tokenizer, ident = _load_model(model, tokenizer, device, dtype)
    was_training = model.training
    model.eval()  # no dropout while scoring; the caller's mode is restored at the end
    try:
        return _collect(model, tokenizer, ident, data, output_dir, max_tokens_per_batch, max_batch_size,
                        shard_size, sampling, max_length, add_special_tokens, append_eos, resume,
                        overwrite, progress, max_new_shards, on_excluded, shard_format, top_k_store)
    finally:
        model.train(was_training)


def _collect(model, tokenizer, ident, data, output_dir, max_tokens_per_batch, max_batch_size, shard_size,
             sampling, max_length, add_special_tokens, append_eos, resume, overwrite, progress,
             max_new_shards, on_excluded, shard_format="parquet", top_k_store=0) -> CollectResult:
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None) or 0

    items = []  # (index, where, record, prompt_ids, response_ids)
    for index, (where, rec) in enumerate(iter_source(data)):
        p, r = tokenize_record(rec, tokenizer, where=where, add_special_tokens=add_special_tokens,
                               append_eos=append_eos)
        if max_length is not None:
            r = r[: max(0, max_length - len(p))]
            p = p[:max_length]
        if not p:
            raise DataFormatError(f"{where}: empty prompt: the first response token would have no context")
        items.append((index, where, rec, p, r))

    settings = {
        **sampling.to_dict(), "shard_size": shard_size, "version": FORMAT_VERSION, "top_k_store": top_k_store,
        "append_eos": bool(append_eos), "add_special_tokens": bool(add_special_tokens),
        "max_length": max_length,
    }
    identity = _identity(model, ident, tokenizer, settings)
    fingerprint = _fingerprint(items, identity)
    plan = _plan(items, shard_size)
    os.makedirs(output_dir, exist_ok=True)
    with _DirLock(output_dir):
        return _collect_locked(model, pad_id, items, plan, identity, fingerprint, settings, ident, output_dir,
                               max_tokens_per_batch, max_batch_size, sampling, resume, overwrite, progress,
                               max_new_shards, on_excluded, shard_format, top_k_store)


def _collect_locked(model, pad_id, items, plan, identity, fingerprint, settings, ident, output_dir,
                    max_tokens_per_batch, max_batch_size, sampling, resume, overwrite, progress,
                    max_new_shards, on_excluded, shard_format, top_k_store=0) -> CollectResult:
    manifest_path = os.path.join(output_dir, MANIFEST)
    if overwrite:
        for name in os.listdir(output_dir):
            if name == MANIFEST or name.startswith("shard-"):
                os.unlink(os.path.join(output_dir, name))
    manifest = {
        "format_version": FORMAT_VERSION, "shard_format": shard_format,
        "fingerprint": fingerprint, "model": ident, "identity": identity,
        "num_examples": len(items), "num_shards": len(plan), "shards": plan, "complete": False, **settings,
    }
    if os.path.exists(manifest_path):
        old = _read_manifest(output_dir)
        if old.get("fingerprint") != fingerprint:
            differs = _what_differs(old.get("identity") or {}, identity)
            what = ("different " + ", ".join(differs)) if differs else "different inputs (the examples differ)"
            raise ValueError(
                f"{output_dir} holds a collection made with {what}; resuming would mix two "
                "collections. Use another output directory or overwrite=True"
            )
        if not resume:
            raise ValueError(f"{output_dir} already holds this collection; pass resume=True or overwrite=True")
        manifest["shard_format"] = _shard_format(old)  # an earlier JSONL collection resumes as JSONL
    elif any(n.startswith("shard-") and n.endswith((".jsonl", ".parquet")) for n in os.listdir(output_dir)):
        raise ValueError(f"{output_dir} has shards but no {MANIFEST}; refusing to mix; use overwrite=True")
    _atomic_write(manifest_path, json.dumps(manifest))

    # stale temporary files of an interrupted run are never read; remove them
    for name in os.listdir(output_dir):
        if name.startswith("shard-") and name.endswith(".tmp"):
            os.unlink(os.path.join(output_dir, name))

    excluded_total = [0]
    fmt = manifest["shard_format"]
    done = []
    for k, members in enumerate(plan):
        path = os.path.join(output_dir, _shard_name(k, fmt))
        if os.path.exists(path):
            try:
                _read_shard(path, items_expected=sorted(items[i][0] for i in members))
                done.append(k)
            except DataFormatError as exc:
                print(f"pear-kernels collect: recomputing {path}: {exc}", file=sys.stderr)
    lengths = [len(it[3]) + len(it[4]) for it in items]
    bar = _progress(len(items), sum(len(plan[k]) for k in done), progress)
    written = 0
    try:
        for k, members in enumerate(plan):
            if k in done:
                continue
            if max_new_shards is not None and written >= max_new_shards:
                break
            rows = {}
            for batch in _batches(members, lengths, max_tokens_per_batch, max_batch_size):
                scores = _score(model, pad_id, [(items[i][3], items[i][4]) for i in batch], sampling, top_k_store)
                if top_k_store:
                    scores, top_ids, top_lps = scores
                else:
                    top_ids = top_lps = [None] * len(batch)
                for i, lp, tid, tlp in zip(batch, scores, top_ids, top_lps):
                    index, where, rec, p, r = items[i]
                    excluded = [j for j, v in enumerate(lp) if v == float("-inf")]
                    if excluded and on_excluded == "error":
                        raise ValueError(
                            f"example {index} ({where}): response token {excluded[0]} (id {r[excluded[0]]}) is "
                            f"outside the kept set of the sampling settings {sampling.to_dict()}: it had "
                            "probability 0 under them, so the data was not sampled with these settings (or "
                            "this teacher); pass the settings it was generated with, or on_excluded='flag'"
                        )
                    excluded_total[0] += len(excluded)
                    row = {key: v for key, v in rec.items() if key not in _OUTPUT_FIELDS + _TOPK_FIELDS}
                    row.update(index=index, prompt_ids=p, response_ids=r, behavior_token_ids=r, behavior_logprobs=lp)
                    if tid is not None:
                        row.update(teacher_ids=tid, teacher_logprobs=tlp)
                    rows[index] = row
                if bar is not None:
                    bar.update(len(batch))
            if fmt == "parquet":
                _write_parquet_shard(os.path.join(output_dir, _shard_name(k, fmt)), [rows[i] for i in sorted(rows)])
            else:
                text = "".join(json.dumps(rows[i]) + "\n" for i in sorted(rows))
                _atomic_write(os.path.join(output_dir, _shard_name(k, fmt)), text)
            written += 1
            if bar is None and progress:
                print(f"pear-kernels collect: shard {k + 1}/{len(plan)} written", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
    complete = all(os.path.exists(os.path.join(output_dir, _shard_name(k, fmt))) for k in range(len(plan)))
    if complete:
        manifest["complete"] = True
        _atomic_write(manifest_path, json.dumps(manifest))
    return CollectResult(output_dir, len(items), len(plan), written, len(done), complete, excluded_total[0])


# ----------------------------------------------------------------------------- generation-time log-probs


def _sampled_logprob(entry, token_id: int, where: str, pos: int) -> float:
    if isinstance(entry, (int, float)) and not isinstance(entry, bool):
        return float(entry)
    if isinstance(entry, dict):
        for key, value in entry.items():
            try:
                k = int(key)
            except (TypeError, ValueError):
                raise DataFormatError(f"{where}: logprobs[{pos}] keys must be token ids, got {key!r}") from None
            if k == token_id:
                v = value.get("logprob") if isinstance(value, dict) else value
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise DataFormatError(f"{where}: logprobs[{pos}][{key!r}] has no numeric logprob")
                return float(v)
        raise DataFormatError(
            f"{where}: logprobs[{pos}] has no entry for the generated token id {token_id}: the recorded "
            "log-probs do not belong to these token ids"
        )
    raise DataFormatError(f"{where}: logprobs[{pos}] must be a number or a {{token_id: logprob}} object")


def _expand_outputs(rec: Dict[str, Any], where: str) -> Iterable[Tuple[str, Dict[str, Any], Dict[str, Any]]]:
    outputs = rec.get("outputs")
    if outputs is None:
        yield where, rec, rec
        return
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise DataFormatError(f"{where}: 'outputs' must be a list of objects")
    for j, out in enumerate(outputs):
        yield f"{where} output {j}", rec, out


_MODES = {"processed": "processed", "processed_logprobs": "processed", "raw": "raw", "raw_logprobs": "raw"}


def _top_k_entries(entry, k: int, where: str, pos: int) -> Tuple[List[int], List[float]]:
    """The k most likely (id, log-prob) pairs of one vLLM-style {token_id: logprob} entry."""
    if not isinstance(entry, dict):
        raise DataFormatError(f"{where}: logprobs[{pos}] must be a {{token_id: logprob}} object to take top-{k} from")
    pairs = []
    for key, value in entry.items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            raise DataFormatError(f"{where}: logprobs[{pos}] keys must be token ids, got {key!r}") from None
        v = value.get("logprob") if isinstance(value, dict) else value
        if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v) or v > BEHAVIOR_LOGPROB_TOLERANCE:
            raise DataFormatError(f"{where}: logprobs[{pos}][{key!r}] is not a log-probability")
        pairs.append((float(v), tid))
    if len(pairs) < k:
        raise DataFormatError(
            f"{where}: logprobs[{pos}] has {len(pairs)} entries, fewer than top_k={k} (generate with logprobs >= {k})"
        )
    pairs.sort(key=lambda x: (-x[0], x[1]))
    top = pairs[:k]
    return [t for _, t in top], [v for v, _ in top]


def ingest_generation_logprobs(source, output_path: Optional[str] = None, *, tokenizer=None,
                               logprobs_mode: Optional[str] = None, top_k: int = 0) -> List[Dict[str, Any]]:
    """Records with behavior log-probs from generation-time logs (vLLM-style).

    Each input record has the prompt ("prompt" text, or "prompt_token_ids"/"prompt_ids") and
    either the generation itself or, as vLLM's RequestOutput, a list "outputs" of them (one
    example each). A generation has "token_ids" (the sampled ids), "logprobs" (per sampled
    token: its log-prob, or a {token_id: logprob or {"logprob": ...}} dict that must contain it)
    and optionally "text". The result uses the data.py format, ids form when the prompt ids are
    known (or a tokenizer is given), text form otherwise; ``load_pear_dataset`` then checks the
    ids against the tokenization. Written atomically as JSONL when ``output_path`` is given.

    ``logprobs_mode``: whether the sampler recorded the log-probs of the distribution it drew
    from ("processed": after temperature / top-k / top-p, what the importance ratio needs) or
    of the plain softmax ("raw"); vLLM calls these processed_logprobs / raw_logprobs. Taken
    from this argument or from each record's "logprobs_mode" field; every output row records
    it as "behavior_logprobs_mode", and records that disagree (with each other or with the
    argument) are refused: a collection mixing the two has no single meaning.

    ``top_k`` > 0: from each position's {token_id: logprob} dict (vLLM's ``logprobs=N`` output,
    which holds the N most likely tokens besides the sampled one) keep the K most likely as
    ``teacher_ids``/``teacher_logprobs`` for fused_pear_distill_loss.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if logprobs_mode is not None and logprobs_mode not in _MODES:
        raise ValueError(f"logprobs_mode must be one of {sorted(_MODES)}, got {logprobs_mode!r}")
    mode = _MODES.get(logprobs_mode) if logprobs_mode is not None else None
    out_records = []
    in_memory = isinstance(source, list) and not all(isinstance(x, (str, os.PathLike)) for x in source)
    for where, rec in _records(source) if in_memory else iter_source(source):
        rec_mode = rec.get("logprobs_mode")
        if rec_mode is not None:
            if rec_mode not in _MODES:
                raise DataFormatError(f"{where}: logprobs_mode must be one of {sorted(_MODES)}, got {rec_mode!r}")
            if mode is not None and _MODES[rec_mode] != mode:
                raise DataFormatError(
                    f"{where}: logprobs_mode {rec_mode!r} differs from {mode!r} (earlier records or the "
                    "argument): raw and processed log-probs cannot be mixed in one collection"
                )
            mode = _MODES[rec_mode]
        for w, parent, gen in _expand_outputs(rec, where):
            token_ids, logprobs = gen.get("token_ids"), gen.get("logprobs")
            if not isinstance(token_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
                raise DataFormatError(f"{w}: 'token_ids' must be a list of integers")
            if not isinstance(logprobs, list):
                raise DataFormatError(f"{w}: 'logprobs' must be a list (one entry per generated token)")
            if len(logprobs) != len(token_ids):
                raise DataFormatError(f"{w}: {len(logprobs)} logprobs entries for {len(token_ids)} generated tokens")
            values = [_sampled_logprob(e, t, w, i) for i, (e, t) in enumerate(zip(logprobs, token_ids))]
            for i, v in enumerate(values):
                if math.isnan(v) or v > BEHAVIOR_LOGPROB_TOLERANCE:
                    raise DataFormatError(f"{w}: logprobs[{i}] = {v!r} is not a log-probability")
            keep = {k: v for k, v in parent.items()
                    if k not in ("outputs", "token_ids", "logprobs", "text", "prompt_token_ids", "prompt_logprobs",
                                 "logprobs_mode")}
            prompt_ids = parent.get("prompt_token_ids", parent.get("prompt_ids"))
            if prompt_ids is None and tokenizer is not None and isinstance(parent.get("prompt"), str):
                prompt_ids = tokenize_record({"prompt": parent["prompt"], "response": ""}, tokenizer, where=w)[0]
            row = dict(keep)
            if prompt_ids is not None:
                row.update(prompt_ids=list(prompt_ids), response_ids=list(token_ids))
            else:
                text = gen.get("text", parent.get("response"))
                if not isinstance(parent.get("prompt"), str) or not isinstance(text, str):
                    raise DataFormatError(
                        f"{w}: need 'prompt_token_ids', or 'prompt' and the generated 'text' (or a tokenizer)"
                    )
                row.update(prompt=parent["prompt"], response=text)
            row.update(behavior_token_ids=list(token_ids), behavior_logprobs=values)
            if top_k:
                tops = [_top_k_entries(e, top_k, w, i) for i, e in enumerate(logprobs)]
                row.update(teacher_ids=[t[0] for t in tops], teacher_logprobs=[t[1] for t in tops])
            out_records.append(row)
    if mode is None:
        mode = "unknown"
    if mode == "unknown" and out_records:
        print("pear-kernels ingest: the log-probs' mode is not recorded (pass logprobs_mode='processed' or "
              "'raw', or --logprobs-mode): stored as 'unknown'", file=sys.stderr)
    for row in out_records:
        row["behavior_logprobs_mode"] = mode
    if output_path is not None:
        _atomic_write(output_path, "".join(json.dumps(r) + "\n" for r in out_records))
    return out_records


def _records(items: List[Any]):
    for i, rec in enumerate(items):
        if not isinstance(rec, dict):
            raise DataFormatError(f"record {i}: must be an object, got {type(rec).__name__}")
        yield f"record {i}", rec
