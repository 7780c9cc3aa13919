"""`exaone chat`: a terminal chat over the engine, streaming, reasoning shown dimmed.

Commands typed at the prompt: /think on|off, /budget N|off, /reset, /exit. Earlier turns keep
only their answers (the chat template drops their reasoning, as the model card advises).
"""
from __future__ import annotations

import sys
import time

from .generate import add_model_arguments, add_sampling_arguments, load_engine, sampling_params

HELP = "/think on|off   /budget N|off   /reset   /exit"


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--system", default=None, help="system prompt")


def run(args) -> int:
    from rich.console import Console

    from exaone.reasoning import ReasoningParser

    console = Console(highlight=False)
    model, tok, engine = load_engine(args)
    think, budget = args.think, args.thinking_budget
    history: list[dict] = []
    console.print(f"[bold]exaone chat[/bold] — {getattr(model, 'name_or_path', 'model')}   {HELP}")
    while True:
        mode = f"think{'' if budget is None else f' ≤{budget}'}" if think else "no-think"
        try:
            line = console.input(f"[bold cyan]you ({mode})>[/bold cyan] ")
        except EOFError:
            console.print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip().lower()
            if cmd == "/exit" or cmd == "/quit":
                return 0
            if cmd == "/reset":
                history.clear()
                console.print("[dim](conversation cleared)[/dim]")
            elif cmd == "/think" and arg in ("on", "off"):
                think = arg == "on"
            elif cmd == "/budget" and (arg == "off" or arg.isdigit()):
                budget = None if arg == "off" else int(arg)
            else:
                console.print(f"[red]unknown command[/red] {line!r}   {HELP}")
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + history
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=think)
        params = sampling_params(args, enable_thinking=think, thinking_budget=budget)
        parser = ReasoningParser(enable_thinking=think)
        show = Printer(console)
        answer, t0, last = show.answer, time.perf_counter(), None
        try:
            handle = engine.submit(ids, params)
            for out in handle:
                last = out
                for ev in parser.feed(out.text):
                    show(ev)
            for ev in parser.finish():
                show(ev)
        except KeyboardInterrupt:
            handle.cancel()
            console.print("[dim](interrupted)[/dim]")
        except ValueError as e:  # e.g. the conversation no longer fits the context
            console.print(f"[red]{e}[/red]  (try /reset)")
            history.pop()
            continue
        dt = time.perf_counter() - t0
        history.append({"role": "assistant", "content": "".join(answer)})
        if last is not None:
            console.print(f"\n[dim][{last.completion_tokens} tokens ({last.reasoning_tokens} reasoning), "
                          f"{last.completion_tokens / max(dt, 1e-9):.1f} tokens/s, {last.finish_reason}][/dim]")
    return 0


class Printer:
    """Prints parser events: reasoning dimmed, then the answer; collects the answer text."""

    def __init__(self, console):
        self.console, self.answer, self.kind = console, [], None

    def __call__(self, ev) -> None:
        if self.kind == "reasoning" and ev.kind != "reasoning":
            self.console.print()  # end the dimmed block before the answer
        self.kind = ev.kind
        if ev.kind == "reasoning":
            self.console.print(ev.text, style="dim", end="", markup=False)
        elif ev.kind == "content":
            self.answer.append(ev.text)
            self.console.print(ev.text, end="", markup=False)
        elif ev.kind == "tool_call":
            tc = ev.tool_call
            self.answer.append(f'<tool_call>{{"name": "{tc.name}", "arguments": {tc.arguments}}}</tool_call>')
            self.console.print(f"[yellow]tool call[/yellow] {tc.name}({tc.arguments})")
        sys.stdout.flush()
