"""`exaone generate`: one prompt in, streamed text out, through the engine.

The prompt goes through the checkpoint's chat template (non-reasoning unless --think) unless
--raw. Reasoning is shown dimmed, then the answer. Thin wrapper over the public API.
"""
from __future__ import annotations

import argparse
import time


def add_model_arguments(p) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (as stored)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only quantization at load time (see docs/quantization.md)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the decode step (default: off; see docs/compiled-decode.md)")
    p.add_argument("--draft-model", default=None, metavar="PATH",
                   help="a smaller checkpoint with the same tokenizer that drafts tokens for greedy requests "
                        "(speculative decoding, exact; see docs/speculative.md)")
    p.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                   help="tokens the draft proposes per target pass (default: 4)")
    p.add_argument("--draft-quantize", default=None, choices=["int8", "int4"],
                   help="weight-only quantization of the draft at load time")


def draft_kwargs(args) -> dict:
    """Engine arguments for --draft-model: the draft loaded with the target's --dtype and --device."""
    if args.draft_model is None:
        return {}
    import exaone

    draft = exaone.load(args.draft_model, dtype=args.dtype, device=args.device, quantize=args.draft_quantize)
    return {"draft_model": draft, "num_speculative_tokens": args.num_speculative_tokens}


def load_engine(args):
    """(model, tokenizer, a batch-1 engine) for the terminal commands, from add_model_arguments' flags."""
    import exaone
    from exaone.engine import Engine

    model = exaone.load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    tok = exaone.load_tokenizer(args.model)
    return model, tok, Engine(model, tokenizer=tok, max_batch=1, compile=args.compile, **draft_kwargs(args))


def add_sampling_arguments(p) -> None:
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--think", action="store_true", help="reasoning mode (enable_thinking=True)")
    p.add_argument("--thinking-budget", type=int, default=None, metavar="N",
                   help="at most N reasoning tokens, then the answer is forced")


def sampling_params(args, **overrides):
    from exaone.sampling import SamplingParams

    kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
              min_p=args.min_p, presence_penalty=args.presence_penalty, seed=args.seed,
              enable_thinking=args.think, thinking_budget=args.thinking_budget)
    kw.update(overrides)
    return SamplingParams(**kw)


def add_arguments(p) -> None:
    p.add_argument("prompt", help="the user message (or raw text with --raw)")
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    p.add_argument("--system", default=None, help="system prompt")


def run(args) -> int:
    from rich.console import Console

    from exaone.reasoning import ReasoningParser

    from .chat import Printer

    console = Console(highlight=False)
    _, tok, engine = load_engine(args)
    if args.raw:
        ids = tok.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=args.think)
    params = sampling_params(args, ignore_eos=args.raw)
    parser = ReasoningParser(enable_thinking=args.think and not args.raw)
    show = Printer(console)
    t0, last = time.perf_counter(), None
    for out in engine.submit(ids, params):
        last = out
        for ev in parser.feed(out.text):
            show(ev)
    for ev in parser.finish():
        show(ev)
    dt = time.perf_counter() - t0
    console.print()
    if last is not None:
        st = engine.stats()
        sp = st.speculative
        spec = (f", draft acceptance {sp.acceptance_rate:.2f}, {sp.tokens_per_round:.2f} tokens per target pass"
                if sp is not None and sp.rounds else "")
        Console(stderr=True, highlight=False).print(f"[dim][{len(ids)} prompt tokens, {last.completion_tokens} generated "
                      f"({last.reasoning_tokens} reasoning), {last.completion_tokens / max(dt, 1e-9):.1f} tokens/s"
                      f"{spec}, finish: {last.finish_reason}][/dim]")
    return 0
