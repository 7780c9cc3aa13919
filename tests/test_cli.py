"""The CLI as a user runs it: init-tiny, generate (chat template, --raw, --think budget, --quantize), chat."""
from __future__ import annotations

import io
import sys

import pytest
import torch

import exaone
from exaone.cli import main
from exaone.generate import generate_reference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["init-tiny", str(path), "--layers", "4", "--hidden", "64", "--sliding-window", "8"]) == 0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / f).is_file()
    return path


def test_generate_raw_greedy_equals_reference(tiny, capsys):
    assert main(["generate", "--model", str(tiny), "--raw", "--max-tokens", "12", "Hello there"]) == 0
    printed = capsys.readouterr().out
    model, tok = exaone.load(tiny), exaone.load_tokenizer(tiny)
    ref = generate_reference(model, tok.encode("Hello there"), max_tokens=12)
    assert printed.rstrip("\n") == tok.decode(ref).rstrip("\n")


def test_generate_think_budget_and_quantize(tiny, capsys):
    args = ["generate", "--model", str(tiny), "--think", "--thinking-budget", "3", "--max-tokens", "10", "hi"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "finish:" in err and "generated" in err
    assert main(args + ["--quantize", "int8"]) == 0


def test_generate_bad_model_is_one_clear_line(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "model directory not found" in err and "Traceback" not in err


def test_chat_commands(tiny, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/think on\n/budget 2\nagain\n/bogus\n/reset\n/exit\n"))
    assert main(["chat", "--model", str(tiny), "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.count("tokens/s") == 2            # two replies with their stats line
    assert "(conversation cleared)" in out and "unknown command" in out
    assert "think ≤2" in out                     # the prompt shows the mode and budget
