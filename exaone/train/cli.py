"""`exaone train`: build the tokenizer and train the demo model on the synthetic tasks.

    exaone train --out runs/nano --steps 3000
    torchrun --nproc-per-node 2 -m exaone.cli train --out runs/nano   # DDP, rank 0 writes

Only argument parsing here; the loop is trainer.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .trainer import NANO, TrainConfig

    d = TrainConfig(out="")
    p.add_argument("--out", required=True, help="output folder: final model, checkpoint/, log.jsonl")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step and process")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps, then cosine decay")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out eval period in steps (0: off)")
    p.add_argument("--eval-per-task", type=int, default=d.eval_per_task)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--tokenizer", default=None, help="reuse a tokenizer folder instead of building one")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--hidden-size", type=int, default=NANO["hidden_size"])
    p.add_argument("--layers", type=int, default=NANO["num_hidden_layers"])
    p.add_argument("--heads", type=int, default=NANO["num_attention_heads"])
    p.add_argument("--kv-heads", type=int, default=NANO["num_key_value_heads"])
    p.add_argument("--intermediate-size", type=int, default=NANO["intermediate_size"])
    p.add_argument("--sliding-window", type=int, default=NANO["sliding_window"])
    p.add_argument("--pattern", default=NANO["sliding_window_pattern"], help='layer plan, e.g. "LLLG"')
    p.add_argument("--embed-std", type=float, default=d.embed_std, help="init std of the token embedding")
    p.add_argument("--post-norm-init", type=float, default=d.post_norm_init,
                   help="initial gain of the post-sublayer norms")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="stop after this many minutes of training; the LR schedule ends there too")
    p.add_argument("--no-progress", action="store_true", help="log JSON lines instead of a progress bar")


def run(args: argparse.Namespace) -> int:
    from .trainer import TrainConfig, train

    if args.hidden_size % args.heads:
        raise ValueError(f"--hidden-size ({args.hidden_size}) must be divisible by --heads ({args.heads})")
    model = dict(hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                 num_key_value_heads=args.kv_heads, head_dim=args.hidden_size // args.heads,
                 intermediate_size=args.intermediate_size, sliding_window=args.sliding_window,
                 sliding_window_pattern=args.pattern)
    cfg = TrainConfig(out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                      min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                      seed=args.seed, eval_every=args.eval_every, eval_per_task=args.eval_per_task,
                      save_every=args.save_every, device=args.device, resume=args.resume,
                      tokenizer=args.tokenizer, vocab_size=args.vocab_size, max_len=args.max_len,
                      threads=args.threads, time_budget_s=args.time_budget * 60 if args.time_budget else None,
                      embed_std=args.embed_std, post_norm_init=args.post_norm_init,
                      model=model)
    result = train(cfg, progress=not args.no_progress and sys.stdout.isatty())
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}, default=str))
    return 0
