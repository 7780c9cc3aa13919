"""`exaone generate`: one prompt in, streamed text out.

The prompt goes through the checkpoint's chat template (non-reasoning unless --think) unless
--raw. Thin wrapper over the public API; no generation logic of its own.
"""
from __future__ import annotations

import sys
import time


def add_model_arguments(p) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (as stored)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")


def add_arguments(p) -> None:
    p.add_argument("prompt", help="the user message (or raw text with --raw)")
    add_model_arguments(p)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--think", action="store_true", help="reasoning mode (enable_thinking=True)")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    p.add_argument("--system", default=None, help="system prompt")


def run(args) -> int:
    import exaone
    from exaone.generate import generate_stream

    model = exaone.load(args.model, dtype=args.dtype, device=args.device)
    tok = exaone.load_tokenizer(args.model)
    if args.raw:
        ids = tok.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=args.think)
    stop = [] if args.raw else model.config.eos_token_ids + [tok.eos_token_id]
    out: list[int] = []
    printed = ""
    t0 = time.perf_counter()
    for t in generate_stream(model, ids, max_tokens=args.max_tokens, temperature=args.temperature,
                             seed=args.seed, stop_ids=stop):
        if t in stop:
            break
        out.append(t)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):  # never print half a UTF-8 character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    dt = time.perf_counter() - t0
    sys.stdout.write(tok.decode(out)[len(printed):] + "\n")
    print(f"[{len(ids)} prompt tokens, {len(out)} generated, {len(out) / dt:.1f} tokens/s]", file=sys.stderr)
    return 0
