"""The command line as a person meets it: one-line errors, exit codes, --version, --help."""

from __future__ import annotations

import errno
import json
import os

import pytest

from pear_kernels.cli import EXIT_CODES, main
from pear_kernels.transformers import collect as collect_mod

from . import hf_utils


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line(err):
    # transformers' own progress bars (loading weights) may share stderr; ours is one line.
    # A tqdm rate ends "it/s]" or, with a postfix (transformers 5.0-5.x: "it/s, Materializing
    # param=...]"), "it/s,"
    lines = [x for x in err.splitlines() if x.strip() and "it/s]" not in x and "it/s," not in x]
    assert len(lines) == 1 and lines[0].startswith("pear-kernels "), err
    assert "Traceback" not in err


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert "pear-kernels 0.1.0" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["collect", "--help"])
    text = capsys.readouterr().out
    for needle in ("exit codes", "input formats", "--overwrite", "--no-append-eos", "prompt_ids", "130"):
        assert needle in text
    assert set(EXIT_CODES) == {0, 1, 2, 3, 4, 130}


@pytest.fixture
def data(tmp_path):
    recs = hf_utils.text_records(3)
    return hf_utils.write_jsonl(tmp_path / "d.jsonl", recs)


def test_missing_file_is_one_line_exit_4(tmp_path, capsys):
    rc, _, err = _run(["validate", str(tmp_path / "nope.jsonl")], capsys)
    assert rc == 4
    _assert_one_line(err)


def test_directory_as_file_is_one_line(tmp_path, capsys):
    d = tmp_path / "dir.jsonl"
    d.mkdir()
    rc, _, err = _run(["ingest-vllm", "--input", hf_utils.write_jsonl(tmp_path / "x.jsonl", []),
                       "--output", str(d)], capsys)
    assert rc == 4
    _assert_one_line(err)


@pytest.mark.parametrize("code,text", [
    (errno.EACCES, "Permission denied"), (errno.ENOSPC, "no space left"), (errno.EFBIG, "file too large"),
])
def test_os_errors_are_one_line(tmp_path, data, capsys, monkeypatch, code, text):
    """Permission (root reads every file here, so it is injected), disk full, file too large."""
    import builtins

    real_open = builtins.open

    def failing_open(path, *a, **k):
        if os.fspath(path) == os.fspath(data):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", failing_open)
    rc, _, err = _run(["validate", data], capsys)
    assert rc == 4
    _assert_one_line(err)
    assert text in err and os.fspath(data) in err


def test_undecodable_bytes_name_file_and_line(tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"prompt_ids": [1], "response_ids": [2], "behavior_logprobs": [-0.1]}\n{"prompt": "\xff\xfe"}\n')
    rc, _, err = _run(["validate", str(p)], capsys)
    assert rc == 1
    _assert_one_line(err)
    assert f"{p}:2" in err and "undecodable" in err


def test_deeply_nested_json(tmp_path, capsys):
    p = tmp_path / "deep.jsonl"
    p.write_text("[" * 100000 + "]" * 100000 + "\n")
    rc, _, err = _run(["validate", str(p)], capsys)
    assert rc == 1
    _assert_one_line(err)
    assert "nested too deeply" in err


def test_malformed_manifest(tmp_path, capsys):
    d = tmp_path / "coll"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"format_version": 1, "complete": True}))
    rc, _, err = _run(["validate", str(d)], capsys)
    assert rc == 1
    _assert_one_line(err)
    assert "malformed manifest" in err


def test_messages_name_flags_not_python_arguments(tmp_path, data, capsys):
    model_dir = hf_utils.save_model_dir(tmp_path / "m")
    tok_dir = hf_utils.save_tokenizer_dir(tmp_path / "tok")
    out = tmp_path / "out"
    base = ["collect", "--model", model_dir, "--tokenizer", tok_dir, "--data", data, "--output", str(out),
            "--no-progress", "--shard-size", "2"]
    assert _run(base, capsys)[0] == 0
    rc, _, err = _run(base + ["--temperature", "0.5"], capsys)
    assert rc == 1
    _assert_one_line(err)
    assert "--overwrite" in err and "overwrite=True" not in err


def test_model_without_tokenizer_says_pass_tokenizer(tmp_path, data, capsys):
    model_dir = hf_utils.save_model_dir(tmp_path / "m")
    rc, _, err = _run(["collect", "--model", model_dir, "--data", data, "--output", str(tmp_path / "o"),
                       "--no-progress"], capsys)
    assert rc == 4
    _assert_one_line(err)
    assert "--tokenizer" in err


def test_ctrl_c_reports_saved_shards(tmp_path, data, capsys, monkeypatch):
    model_dir = hf_utils.save_model_dir(tmp_path / "m")
    tok_dir = hf_utils.save_tokenizer_dir(tmp_path / "tok")
    out = tmp_path / "out"
    real = collect_mod._score
    calls = {"n": 0}

    def interrupt_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(collect_mod, "_score", interrupt_second)
    rc, _, err = _run(["collect", "--model", model_dir, "--tokenizer", tok_dir, "--data", data,
                       "--output", str(out), "--no-progress", "--shard-size", "1",
                       "--max-tokens-per-batch", "8"], capsys)
    assert rc == 130
    _assert_one_line(err)
    assert "1 shard(s) are saved" in err and "rerun" in err
    assert not (out / collect_mod.LOCK).exists()  # the lock is released on the way out
