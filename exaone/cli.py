"""The `exaone` command: one entry point, one module per subcommand, imported lazily.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`. Only the chosen
subcommand's module is imported, so `exaone --help` stays fast and optional dependencies (the
server's, eval's) are needed only by the command that uses them.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> (module, one-line help)
COMMANDS = {
    "generate": ("exaone.commands.generate", "generate text from a prompt (chat template unless --raw)"),
    "chat": ("exaone.commands.chat", "interactive terminal chat with streaming and reasoning control"),
    "init-tiny": ("exaone.commands.init_tiny", "write a tiny random EXAONE 4.0 checkpoint (for tests and demos)"),
    "train": ("exaone.train.cli", "train the tokenizer and the demo model (pretrain / hybrid SFT)"),
    "serve": ("exaone.server.cli", "OpenAI-compatible API server with keys and metering"),
    "keys": ("exaone.server.keys_cli", "manage API keys"),
    "usage": ("exaone.server.usage_cli", "usage and billing report"),
    "eval": ("exaone.eval.cli", "benchmark a model in reasoning and non-reasoning mode"),
    "bench": ("exaone.commands.bench", "speed benchmark (see bench/)"),
    "export": ("exaone.commands.export", "export a checkpoint: GGUF for llama.cpp, or int8/int4 weight-only"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (mod, help_) in COMMANDS.items():
        if importlib.util.find_spec(mod.rsplit(".", 1)[0]) is None:
            continue
        try:
            if importlib.util.find_spec(mod) is not None:
                out[name] = (mod, help_)
        except ModuleNotFoundError:
            continue
    return out


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="exaone", description="EXAONE 4.0: run, serve, evaluate and train.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = _available()
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (mod, help_) in commands.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:  # import only the module that will run
            importlib.import_module(mod).add_arguments(p)
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(commands[args.command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError) as e:
        # User errors (bad paths, bad checkpoints, bad parameters): one clear line, no traceback.
        print(f"exaone {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ConnectionError as e:
        # A database or service that cannot be reached (e.g. the ledger): one line, exit 1.
        print(f"exaone {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
