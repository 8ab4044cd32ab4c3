"""PEAR SFT data: (prompt, response) with the behavior policy's per-token log-probs.

One example is a JSON object (a JSONL line or a Parquet row) in one of three forms:

    {"prompt": str, "response": str, ...}                 text, tokenized here
    {"messages": [{"role": ..., "content": ...}, ...]}    chat, the last message is the response
    {"prompt_ids": [int], "response_ids": [int], ...}     token ids

plus the behavior log-probs and the token ids they were computed on:

    "behavior_logprobs":  [float]   log pi_beta of each token
    "behavior_token_ids": [int]     the tokens those log-probs belong to

either over the response only (same length as the response) or over the whole sequence (same
length as prompt + response; prompt entries may be null). With token ids as input,
``behavior_token_ids`` defaults to ``response_ids``; with text it is required, because the
stored ids are the only way to check the tokenization.

``build_example`` returns ``input_ids``, ``attention_mask``, ``labels`` (prompt = -100) and
``behavior_logprobs`` aligned with input_ids: behavior_logprobs[i] = log pi_beta(input_ids[i] |
input_ids[:i]); the model shifts it exactly like labels. An example whose stored token ids
differ from the tokenization is refused (MisalignedExampleError with the example index and the
first differing position), never shifted to fit; ``skip_misaligned=True`` skips and counts it.

The response is what the behavior policy generated after the prompt ids, so prompt and
response are tokenized separately (prompt with the tokenizer's special tokens, response
without) and concatenated; for chat, the prompt is the chat template of all but the last
message with a generation prompt, and it must be a prefix of the template of all messages.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..checks import BEHAVIOR_LOGPROB_TOLERANCE, IGNORE_INDEX
from .formats import DataFormatError, _is_int, iter_source, read_records
from .tokenizing import tokenize_record

# DataFormatError and read_records (formats.py) and tokenize_record (tokenizing.py) are
# re-exported from here, where they used to be defined.
__all__ = [
    "DataFormatError",
    "MisalignedExampleError",
    "build_example",
    "load_pear_dataset",
    "read_records",
    "tokenize_record",
]


class MisalignedExampleError(ValueError):
    """Stored behavior token ids differ from the tokenization of the example."""

    def __init__(self, index: int, where: str, position: int, stored, tokenized, detail: str = ""):
        self.index, self.where, self.position = index, where, position
        self.stored, self.tokenized = stored, tokenized
        super().__init__(
            f"example {index} ({where}): behavior_token_ids differ from the tokenization at input "
            f"position {position}: stored {stored!r}, tokenized {tokenized!r}{detail}. The log-probs "
            "would be misaligned; fix the data or pass skip_misaligned=True to skip such examples"
        )
        self._detail = detail

    def __reduce__(self):  # num_proc workers send it back to the parent intact
        return (type(self), (self.index, self.where, self.position, self.stored, self.tokenized, self._detail))


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


# Token ids are stored as int32 in Parquet shards and index an embedding table: anything at or
# above 2**31 (or negative) is corrupt data, whatever the tokenizer.
_MAX_TOKEN_ID = 2**31 - 1


def _vocab_size(tokenizer) -> Optional[int]:
    if tokenizer is None:
        return None
    try:
        return len(tokenizer)
    except TypeError:
        return getattr(tokenizer, "vocab_size", None)


def _stored_ids_end_with_eos(rec, tokenizer, where, add_special_tokens) -> bool:
    """For a text record: do its stored behavior ids equal the tokenization plus EOS?"""
    stored = rec.get("behavior_token_ids")
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if stored is None or eos is None or not stored or stored[-1] != eos:
        return False
    if rec.get("prompt_ids") is not None and rec.get("messages") is None and not isinstance(rec.get("response"), str):
        return False  # an ids record: nothing is tokenized
    try:
        p, r = tokenize_record(rec, tokenizer, where=where, add_special_tokens=add_special_tokens, append_eos=False)
    except DataFormatError:
        return False
    if rec.get("prompt_ids") is not None:  # ids and text (a collected row): the text decides
        text_only = {k: v for k, v in rec.items() if k not in ("prompt_ids", "response_ids")}
        p, r = tokenize_record(text_only, tokenizer, where=where, add_special_tokens=add_special_tokens,
                               append_eos=False)
    return list(stored) in (r + [eos], p + r + [eos])


def _check_id_range(rec, ids: Sequence[int], tokenizer, where: str) -> None:
    """Every stored id (prompt, response, behavior ids) is a valid index of the vocabulary."""
    limit = _vocab_size(tokenizer)
    upper = limit if limit is not None else _MAX_TOKEN_ID + 1
    for name, values in (("input", ids), ("behavior_token_ids", rec.get("behavior_token_ids") or [])):
        for pos, t in enumerate(values):
            if not 0 <= t < upper:
                what = f"the tokenizer's vocabulary of {limit}" if limit is not None else "int32 token ids"
                raise DataFormatError(
                    f"{where}: {name} id {t} at position {pos} is outside [0, {upper}) ({what})"
                )


def _check_stored_ids_retokenize(rec, prompt_ids, response_ids, tokenizer, index, where,
                                 add_special_tokens, append_eos) -> None:
    """A record that stores both text and token ids (what ``collect`` writes) is re-tokenised
    with the training tokenizer: the stored ids must be what this tokenizer makes of the text.
    A tokenizer that differs from the collection's (another class, another vocabulary, another
    special-token setting) would otherwise pair every log-prob with the wrong token."""
    if tokenizer is None or rec.get("prompt_ids") is None:
        return
    has_text = rec.get("messages") is not None or (
        isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str)
    )
    if not has_text:
        return
    text_only = {k: v for k, v in rec.items() if k not in ("prompt_ids", "response_ids")}
    p2, r2 = tokenize_record(text_only, tokenizer, where=where, add_special_tokens=add_special_tokens,
                             append_eos=append_eos)
    stored, fresh = list(prompt_ids) + list(response_ids), p2 + r2
    if stored != fresh:
        pos = _first_difference(stored, fresh)
        s_ = stored[pos] if pos < len(stored) else "<end>"
        t_ = fresh[pos] if pos < len(fresh) else "<end>"
        raise MisalignedExampleError(
            index, where, pos, s_, t_,
            " (the stored token ids are not this tokenizer's tokenization of the stored text: the "
            "training tokenizer, append_eos or add_special_tokens differ from the collection's)",
        )


def build_example(
    rec: Dict[str, Any],
    tokenizer=None,
    *,
    index: int = 0,
    where: str = "record",
    max_length: Optional[int] = None,
    add_special_tokens: bool = True,
    append_eos: Optional[bool] = None,
    ignore_index: int = IGNORE_INDEX,
) -> Dict[str, List]:
    """One training example: input_ids, attention_mask, labels and aligned behavior_logprobs.

    ``append_eos`` (text records): True appends the tokenizer's EOS to the response, False
    does not, None (default) follows the stored ``behavior_token_ids``: EOS is appended exactly
    when the data was collected with it (collection appends it by default, as TRL does), so
    the stored ids decide and nothing is guessed.
    """
    if append_eos is None:
        append_eos = _stored_ids_end_with_eos(rec, tokenizer, where, add_special_tokens)
    prompt_ids, response_ids = tokenize_record(
        rec, tokenizer, where=where, add_special_tokens=add_special_tokens, append_eos=append_eos
    )
    _check_id_range(rec, prompt_ids + response_ids, tokenizer, where)
    _check_stored_ids_retokenize(rec, prompt_ids, response_ids, tokenizer, index, where,
                                 add_special_tokens, append_eos)
    input_ids = prompt_ids + response_ids
    P, L = len(prompt_ids), len(input_ids)
    logprobs = rec.get("behavior_logprobs")
    if logprobs is None:
        raise DataFormatError(f"{where}: missing 'behavior_logprobs'")
    stored = rec.get("behavior_token_ids")
    if stored is None:
        if rec.get("response_ids") is None:
            raise DataFormatError(
                f"{where}: text records need 'behavior_token_ids' (the ids the log-probs were computed on) "
                "so the tokenization can be checked"
            )
        stored = rec["response_ids"]
    if len(stored) != len(logprobs):
        raise DataFormatError(
            f"{where}: 'behavior_logprobs' has {len(logprobs)} entries but 'behavior_token_ids' has {len(stored)}"
        )
    full_span = len(stored) == L and len(stored) != len(response_ids)
    reference, offset = (input_ids, 0) if full_span else (response_ids, P)
    if list(stored) != reference:
        pos = _first_difference(stored, reference)
        s = stored[pos] if pos < len(stored) else "<end>"
        t = reference[pos] if pos < len(reference) else "<end>"
        detail = "" if len(stored) == len(reference) else (
            f" (stored {len(stored)} ids, tokenization has {len(reference)}"
            f"{' response' if not full_span else ''} tokens)"
        )
        raise MisalignedExampleError(index, where, offset + pos, s, t, detail)

    behavior = [0.0] * L
    for i, v in enumerate(logprobs):
        pos = offset + i
        if pos < P:
            continue  # prompt positions are not supervised; their values are unused
        if v is None or (isinstance(v, float) and math.isnan(v)) or v > BEHAVIOR_LOGPROB_TOLERANCE:
            raise DataFormatError(
                f"{where}: behavior_logprobs at input position {pos} must be a log-probability (<= 0), got {v!r}"
            )
        behavior[pos] = float(v)
    labels = [ignore_index] * P + list(response_ids)
    teacher = _teacher_columns(rec, P, L, len(response_ids), where)
    if max_length is not None:
        input_ids, labels, behavior = input_ids[:max_length], labels[:max_length], behavior[:max_length]
        if teacher is not None:
            teacher = (teacher[0][:max_length], teacher[1][:max_length])
    out = {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": labels,
        "behavior_logprobs": behavior,
    }
    if teacher is not None:
        out["teacher_ids"], out["teacher_logprobs"] = teacher
    return out


def _teacher_columns(rec, P: int, L: int, R: int, where: str):
    """Stored teacher top-k (``teacher_ids``/``teacher_logprobs``, one list of K per response
    token, as ``collect --top-k`` writes them) aligned with input_ids: (L, K) each, prompt
    positions filled with K distinct ids 0..K-1 and log-probs 0 (never supervised, never read)."""
    ids, lps = rec.get("teacher_ids"), rec.get("teacher_logprobs")
    if ids is None and lps is None:
        return None
    if ids is None or lps is None:
        raise DataFormatError(f"{where}: 'teacher_ids' and 'teacher_logprobs' come together")
    if len(ids) != R or len(lps) != R:
        raise DataFormatError(
            f"{where}: teacher_ids/teacher_logprobs have {len(ids)}/{len(lps)} entries for {R} response tokens"
        )
    K = len(ids[0]) if R else 0
    for j, (a, b) in enumerate(zip(ids, lps)):
        if len(a) != K or len(b) != K:
            raise DataFormatError(f"{where}: teacher top-k entry {j} has {len(a)} ids and {len(b)} log-probs, not {K}")
    pad_ids, pad_lp = [list(range(K))] * P, [[0.0] * K] * P
    return pad_ids + [list(a) for a in ids], pad_lp + [[float(x) for x in b] for b in lps]


# ----------------------------------------------------------------------------- data set


def _datasets():
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - the hf extra installs it
        raise ImportError("load_pear_dataset needs the datasets package: pip install -e \".[hf]\"") from exc
    return datasets


def _make_pear_dataset_class():
    datasets = _datasets()

    class PEARDataset(datasets.Dataset):
        """A ``datasets.Dataset`` of tokenized PEAR examples (Arrow-backed; accepted wherever a
        Dataset is: Trainer, TRL's SFTTrainer, ``map``/``filter``/``save_to_disk``), plus what was
        skipped while loading: ``skipped`` holds (index, location, reason) triples."""

        skipped: List[Tuple[int, str, str]] = []

        @property
        def num_skipped(self) -> int:
            return len(self.skipped)

        @property
        def examples(self) -> List[Dict[str, List]]:
            """The examples as plain Python lists (a copy)."""
            return self.to_list()

        def to_hf_dataset(self):
            """Kept for older callers: this already is a datasets.Dataset."""
            return self

        @classmethod
        def wrap(cls, ds, skipped):
            ds.__class__ = cls
            ds.skipped = list(skipped)
            return ds

    return PEARDataset


_PEAR_DATASET = None


def __getattr__(name):  # PEP 562: the datasets import happens when PEARDataset is first needed
    global _PEAR_DATASET
    if name == "PEARDataset":
        if _PEAR_DATASET is None:
            _PEAR_DATASET = _make_pear_dataset_class()
        return _PEAR_DATASET
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_or_skip(index, where, rec, tokenizer, max_length, skip_misaligned, add_special_tokens, append_eos,
                   ignore_index):
    """(example, None) or (None, reason) for one record."""
    try:
        ex = build_example(
            rec, tokenizer, index=index, where=where, max_length=max_length,
            add_special_tokens=add_special_tokens, append_eos=append_eos, ignore_index=ignore_index,
        )
    except MisalignedExampleError as exc:
        if not skip_misaligned:
            raise
        return None, str(exc)
    if all(y == ignore_index for y in ex["labels"][1:]):
        return None, "no supervised token (empty response, or truncated away)"
    return ex, None


def _build_slice(start, items, kw):
    """Worker body for num_proc: (index, where, example, reason) per record, in order."""
    return [(start + i, where) + _build_or_skip(start + i, where, rec, **kw) for i, (where, rec) in enumerate(items)]


def _build_in_workers(items, num_proc: int, kw):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if not items:
        return []
    # a few slices per worker evens out uneven lengths; spawn, not fork: a forked child of a
    # process that already ran torch or a Rust tokenizer's thread pool can deadlock
    step = max(1, -(-len(items) // (4 * num_proc)))
    with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_build_slice, i, items[i:i + step], kw) for i in range(0, len(items), step)]
        out = []
        try:
            for f in futures:  # in input order: the first failing example raises first
                out.extend(f.result())
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return out


def load_pear_dataset(
    source,
    tokenizer=None,
    *,
    max_length: Optional[int] = None,
    skip_misaligned: bool = False,
    add_special_tokens: bool = True,
    append_eos: Optional[bool] = None,
    ignore_index: int = IGNORE_INDEX,
    streaming: bool = False,
    num_proc: Optional[int] = None,
):
    """Load and align PEAR examples from JSONL/Parquet files, a ``collect`` output dir, or records.

    Returns a ``PEARDataset``, a ``datasets.Dataset`` (Arrow-backed) with the columns
    input_ids, attention_mask, labels, behavior_logprobs (and teacher_ids/teacher_logprobs
    when the data carries the teacher's top-k), plus ``.skipped`` / ``.num_skipped``.
    ``streaming=True`` returns a ``datasets.IterableDataset`` that builds examples lazily as it
    is iterated (for inputs larger than memory; nothing is counted, skipped examples are
    dropped as they come, a misaligned one still raises unless ``skip_misaligned``).
    Every check keeps its message with file and line.
    ``num_proc`` tokenizes and checks in that many worker processes (spawned, so safe beside
    torch and a tokenizer's threads); records are read in this process, examples keep their
    order, and the first failing example (in input order) raises as it would with one process.

    ``append_eos``: see build_example (None: follow the stored token ids).
    ``max_length`` truncates from the end; an example left without a supervised token is
    skipped and counted. ``skip_misaligned`` skips (and counts, in ``.skipped``) examples whose
    stored token ids differ from the tokenization instead of raising MisalignedExampleError.
    """
    if max_length is not None and (not _is_int(max_length) or max_length < 2):
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if num_proc is not None and (not _is_int(num_proc) or num_proc < 1):
        raise ValueError(f"num_proc must be an int >= 1 or None, got {num_proc!r}")
    if streaming and num_proc not in (None, 1):
        raise ValueError("num_proc > 1 needs the whole input: it cannot be combined with streaming=True")
    datasets = _datasets()
    kw = dict(tokenizer=tokenizer, max_length=max_length, skip_misaligned=skip_misaligned,
              add_special_tokens=add_special_tokens, append_eos=append_eos, ignore_index=ignore_index)
    if streaming:
        def generate():
            for index, (where, rec) in enumerate(iter_source(source)):
                ex, _ = _build_or_skip(index, where, rec, **kw)
                if ex is not None:
                    yield ex

        return datasets.IterableDataset.from_generator(generate)
    examples, skipped = [], []
    if num_proc is not None and num_proc > 1:
        built = _build_in_workers(list(iter_source(source)), num_proc, kw)
    else:
        built = ((index, where) + _build_or_skip(index, where, rec, **kw)
                 for index, (where, rec) in enumerate(iter_source(source)))
    for index, where, ex, reason in built:
        if ex is None:
            skipped.append((index, where, reason))
        else:
            examples.append(ex)
    ds = datasets.Dataset.from_list(examples) if examples else datasets.Dataset.from_dict(
        {"input_ids": [], "attention_mask": [], "labels": [], "behavior_logprobs": []}
    )
    return __getattr__("PEARDataset").wrap(ds, skipped)
