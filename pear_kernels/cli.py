"""The ``pear-kernels`` command line (tools layer).

    pear-kernels collect --model DIR --data FILE [FILE ...] --output DIR [options]
    pear-kernels ingest-vllm --input FILE --output FILE [--tokenizer DIR]
    pear-kernels validate PATH [--tokenizer DIR] [--skip-misaligned] [--max-length N]

``collect`` computes behavior log-probs with a local model directory (resumable: rerun the same
command after an interruption); ``ingest-vllm`` converts generation-time log-probs; ``validate``
loads a data set exactly as training would and reports what it found.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pear-kernels", description="PEAR data tools")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("collect", help="compute behavior log-probs with a local model")
    c.add_argument("--model", required=True, help="local model directory (the behavior policy)")
    c.add_argument("--data", required=True, nargs="+", help="JSONL or Parquet file(s)")
    c.add_argument("--output", required=True, help="output directory (shards + manifest)")
    c.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    c.add_argument("--max-tokens-per-batch", type=int, default=8192)
    c.add_argument("--max-batch-size", type=int, default=None)
    c.add_argument("--shard-size", type=int, default=256)
    c.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    c.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
    c.add_argument("--temperature", type=float, default=1.0, help="the behavior policy's sampling temperature")
    c.add_argument("--max-length", type=int, default=None)
    c.add_argument("--append-eos", action="store_true", help="append EOS to text responses")
    c.add_argument("--no-special-tokens", action="store_true", help="tokenize prompts without special tokens")
    c.add_argument("--no-resume", action="store_true", help="refuse to continue an earlier run")
    c.add_argument("--overwrite", action="store_true", help="delete an earlier collection first")
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--max-new-shards", type=int, default=None, help="stop after this many shards")
    c.add_argument("--merge-to", default=None, help="also write all rows, in input order, to this JSONL file")

    g = sub.add_parser("ingest-vllm", help="convert generation-time (vLLM-style) log-probs")
    g.add_argument("--input", required=True, nargs="+")
    g.add_argument("--output", required=True, help="output JSONL file")
    g.add_argument("--tokenizer", help="tokenizer directory, to tokenize text prompts")

    v = sub.add_parser("validate", help="load a data set as training would and report")
    v.add_argument("path", nargs="+", help="JSONL/Parquet file(s) or a collect output directory")
    v.add_argument("--tokenizer", help="tokenizer directory (needed for text records)")
    v.add_argument("--skip-misaligned", action="store_true")
    v.add_argument("--max-length", type=int, default=None)
    v.add_argument("--append-eos", action="store_true")
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


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .transformers import collect as collect_mod
        from .transformers.data import load_pear_dataset
    except ImportError as exc:
        print(f"pear-kernels: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "collect":
            import torch

            result = collect_mod.collect_behavior_logprobs(
                args.model, args.data if len(args.data) > 1 else args.data[0], args.output,
                tokenizer=_tokenizer(args.tokenizer), max_tokens_per_batch=args.max_tokens_per_batch,
                max_batch_size=args.max_batch_size, shard_size=args.shard_size, device=_device(args.device),
                dtype=getattr(torch, _DTYPES[args.dtype]) if args.dtype else None,
                temperature=args.temperature, max_length=args.max_length,
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
                tokenizer=_tokenizer(args.tokenizer),
            )
            print(json.dumps({"records": len(records), "output": args.output}))
            return 0
        if args.command == "validate":
            ds = load_pear_dataset(
                args.path if len(args.path) > 1 else args.path[0], _tokenizer(args.tokenizer),
                max_length=args.max_length, skip_misaligned=args.skip_misaligned, append_eos=args.append_eos,
            )
            tokens = sum(sum(1 for y in ex["labels"][1:] if y != -100) for ex in ds)
            print(json.dumps({"examples": len(ds), "skipped": ds.num_skipped, "supervised_tokens": tokens}))
            for index, where, reason in ds.skipped[:20]:
                print(f"skipped example {index} ({where}): {reason}", file=sys.stderr)
            return 0
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"pear-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
