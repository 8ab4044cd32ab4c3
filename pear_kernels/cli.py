"""The ``pear-kernels`` command line (tools layer).

    pear-kernels collect --model DIR --data FILE [FILE ...] --output DIR [options]
    pear-kernels ingest-vllm --input FILE --output FILE [--tokenizer DIR]
    pear-kernels validate PATH [--tokenizer DIR] [--skip-misaligned] [--max-length N]

``collect`` computes behavior log-probs with a local model directory (resumable: rerun the same
command after an interruption); ``ingest-vllm`` converts generation-time log-probs; ``validate``
loads a data set exactly as training would and reports what it found.

Every error is one line on stderr (no traceback) with a documented exit code.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import List, Optional

from .checks import IGNORE_INDEX

__all__ = ["main", "build_parser", "EXIT_CODES"]

EXIT_CODES = {
    0: "success",
    1: "invalid data or arguments (the message names the file, line or flag)",
    2: "usage error, or an optional dependency is missing (the message names the extra)",
    3: "collect stopped by --max-new-shards before the end (rerun the same command to go on)",
    4: "file system error (permission, not found, is a directory, disk full, ...)",
    130: "interrupted (Ctrl-C); collect keeps the shards it saved and a rerun resumes",
}

_FORMATS = """input formats (JSONL lines or Parquet rows; one example each):
  {"prompt": str, "response": str}                     text, tokenized with --tokenizer
  {"messages": [{"role": ..., "content": ...}, ...]}   chat; the last message is the response
  {"prompt_ids": [int], "response_ids": [int]}         token ids
  plus, for training/validate: "behavior_logprobs": [float] and "behavior_token_ids": [int]
  (the ids the log-probs belong to; over the response, or over prompt + response)."""


def _epilog() -> str:
    codes = "\n".join(f"  {k:>3}  {v}" for k, v in EXIT_CODES.items())
    return f"{_FORMATS}\n\nexit codes:\n{codes}"

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="pear-kernels", description="PEAR data tools", epilog=_epilog(),
                                     formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"pear-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("collect", help="compute behavior log-probs with a local model", epilog=_epilog(),
                       formatter_class=fmt,
                       description="Run a local model (the behavior policy) over a data set and store "
                                   "log pi_beta of every response token beside its token ids, in atomic "
                                   "shards with a manifest; rerun the same command to resume.")
    c.add_argument("--model", required=True, help="local model directory (the behavior policy)")
    c.add_argument("--data", required=True, nargs="+", help="JSONL or Parquet file(s)")
    c.add_argument("--output", required=True, help="output directory (shards + manifest)")
    c.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    c.add_argument("--max-tokens-per-batch", type=int, default=8192,
                   help="padded tokens per forward: batch size x longest sequence (default 8192)")
    c.add_argument("--max-batch-size", type=int, default=None, help="examples per forward at most")
    c.add_argument("--shard-size", type=int, default=256,
                   help="examples per atomically written shard, the unit of resumption (default 256)")
    c.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    c.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="load the model in this dtype")
    c.add_argument("--temperature", type=float, default=1.0, help="the behavior policy's sampling temperature")
    c.add_argument("--sample-top-k", dest="top_k", type=int, default=0, help="the top-k it sampled with (0: off)")
    c.add_argument("--top-p", type=float, default=1.0, help="the top-p it sampled with (1: off)")
    c.add_argument("--min-p", type=float, default=0.0, help="the min-p it sampled with (0: off)")
    c.add_argument("--top-k", dest="top_k_store", type=int, default=0,
                   help="also store the teacher's K most likely ids and log-probs per response position "
                        "(for fused_pear_distill_loss); the sampler's top-k is --sample-top-k")
    c.add_argument("--shard-format", choices=("parquet", "jsonl"), default="parquet",
                   help="shard files: parquet (default; int32 ids, float32 log-probs) or jsonl")
    c.add_argument("--on-excluded", choices=("error", "flag"), default="error",
                   help="a response token outside the sampler's kept set: refuse (default) or store -inf")
    c.add_argument("--max-length", type=int, default=None, help="truncate prompt + response to N tokens")
    c.add_argument("--append-eos", dest="append_eos", action="store_true", default=True,
                   help="append EOS to text responses (default, as TRL does)")
    c.add_argument("--no-append-eos", dest="append_eos", action="store_false",
                   help="do not append EOS to text responses")
    c.add_argument("--no-special-tokens", action="store_true", help="tokenize prompts without special tokens")
    c.add_argument("--no-resume", action="store_true", help="refuse to continue an earlier run")
    c.add_argument("--overwrite", action="store_true", help="delete an earlier collection first")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--max-new-shards", type=int, default=None, help="stop after this many shards")
    c.add_argument("--merge-to", default=None, help="also write all rows, in input order, to this JSONL file")

    g = sub.add_parser("ingest-vllm", help="convert generation-time (vLLM-style) log-probs", epilog=_epilog(),
                       formatter_class=fmt)
    g.add_argument("--input", required=True, nargs="+", help="JSONL file(s) of vLLM-style request outputs")
    g.add_argument("--output", required=True, help="output JSONL file")
    g.add_argument("--tokenizer", help="tokenizer directory, to tokenize text prompts")
    g.add_argument("--top-k", type=int, default=0,
                   help="also keep the K most likely ids and log-probs of each position (teacher_ids / "
                        "teacher_logprobs, for distillation); the records need logprobs dicts with >= K entries")
    g.add_argument("--logprobs-mode", choices=("processed", "raw"), default=None,
                   help="whether the sampler recorded log-probs of the distribution it drew from "
                        "(processed: after temperature/top-k/top-p, vLLM's processed_logprobs) or of "
                        "the plain softmax (raw); records may carry it as 'logprobs_mode'")

    v = sub.add_parser("validate", help="load a data set as training would and report", epilog=_epilog(),
                       formatter_class=fmt)
    v.add_argument("path", nargs="+", help="JSONL/Parquet file(s) or a collect output directory")
    v.add_argument("--tokenizer", help="the training tokenizer's directory: text is re-tokenised and "
                   "every stored id checked against it (needed for text records)")
    v.add_argument("--skip-misaligned", action="store_true", help="skip and count misaligned examples")
    v.add_argument("--max-length", type=int, default=None, help="truncate examples to N tokens")
    v.add_argument("--append-eos", dest="append_eos", action="store_true", default=None,
                   help="append EOS to text responses (default: as the stored token ids show)")
    v.add_argument("--no-append-eos", dest="append_eos", action="store_false")
    return parser


def _tokenizer(path):
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _device(name):
    import torch

    if name is not None:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Python argument names in library messages -> the flags a command-line user types
_FLAG_NAMES = (
    ("overwrite=True", "--overwrite"),
    ("resume=True", "a rerun without --no-resume"),
    ("pass tokenizer=...", "pass --tokenizer DIR"),
    ("skip_misaligned=True", "--skip-misaligned"),
    ("max_new_shards", "--max-new-shards"),
    ("on_excluded='flag'", "--on-excluded flag"),
)


def _flags(text: str) -> str:
    for py, flag in _FLAG_NAMES:
        text = text.replace(py, flag)
    return text


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _os_error(exc: OSError) -> str:
    if exc.errno is None:  # raised with a message of its own
        return _one_line(exc)
    reason = {
        errno.ENOSPC: "no space left on the device",
        errno.EFBIG: "file too large",
        errno.EDQUOT: "disk quota exceeded",
    }.get(exc.errno, exc.strerror or type(exc).__name__)
    where = exc.filename if exc.filename is not None else ""
    return f"{reason}: {where}" if where else reason


def _saved_shards(output: str) -> int:
    try:
        return sum(1 for n in os.listdir(output) if n.startswith("shard-") and not n.endswith(".tmp"))
    except OSError:
        return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"pear-kernels {args.command}"
    try:
        from .transformers import collect as collect_mod
        from .transformers.data import load_pear_dataset
    except ImportError as exc:
        print(f"{prog}: error: {_one_line(exc)} (install the extra: pip install -e \".[hf]\")", file=sys.stderr)
        return 2
    try:
        return _run(args, collect_mod, load_pear_dataset)
    except KeyboardInterrupt:
        if args.command == "collect":
            n = _saved_shards(args.output)
            print(f"{prog}: interrupted; {n} shard(s) are saved in {args.output}; rerun the same command "
                  "to resume", file=sys.stderr)
        else:
            print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # before ValueError: an OSError is not a data problem
        print(f"{prog}: error: {_os_error(exc)}", file=sys.stderr)
        return 4
    except RecursionError:
        print(f"{prog}: error: a record is nested too deeply to read", file=sys.stderr)
        return 1
    except (ValueError, KeyError, TypeError) as exc:
        print(f"{prog}: error: {_flags(_one_line(exc))}", file=sys.stderr)
        return 1


def _run(args, collect_mod, load_pear_dataset) -> int:
    if args.command == "collect":
        import torch

        result = collect_mod.collect_behavior_logprobs(
            args.model, args.data if len(args.data) > 1 else args.data[0], args.output,
            tokenizer=_tokenizer(args.tokenizer), max_tokens_per_batch=args.max_tokens_per_batch,
            max_batch_size=args.max_batch_size, shard_size=args.shard_size, device=_device(args.device),
            dtype=getattr(torch, _DTYPES[args.dtype]) if args.dtype else None,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            on_excluded=args.on_excluded, shard_format=args.shard_format, top_k_store=args.top_k_store,
            max_length=args.max_length,
            add_special_tokens=not args.no_special_tokens, append_eos=args.append_eos,
            resume=not args.no_resume, overwrite=args.overwrite, progress=not args.no_progress,
            max_new_shards=args.max_new_shards,
        )
        print(json.dumps(result.__dict__))
        if args.merge_to and result.complete:
            rows = collect_mod.read_collected(args.output)
            collect_mod._atomic_write(args.merge_to, "".join(json.dumps(r) + "\n" for r in rows))
        return 0 if result.complete else 3
    if args.command == "ingest-vllm":
        records = collect_mod.ingest_generation_logprobs(
            args.input if len(args.input) > 1 else args.input[0], args.output,
            tokenizer=_tokenizer(args.tokenizer), logprobs_mode=args.logprobs_mode, top_k=args.top_k,
        )
        print(json.dumps({"records": len(records), "output": args.output}))
        return 0
    if args.command == "validate":
        ds = load_pear_dataset(
            args.path if len(args.path) > 1 else args.path[0], _tokenizer(args.tokenizer),
            max_length=args.max_length, skip_misaligned=args.skip_misaligned, append_eos=args.append_eos,
        )
        tokens = sum(sum(1 for y in ex["labels"][1:] if y != IGNORE_INDEX) for ex in ds)
        print(json.dumps({"examples": len(ds), "skipped": ds.num_skipped, "supervised_tokens": tokens}))
        for index, where, reason in ds.skipped[:20]:
            print(f"skipped example {index} ({where}): {_one_line(reason)}", file=sys.stderr)
        return 0
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
