"""`exaone init-tiny DIR`: write a tiny random EXAONE 4.0 checkpoint in the Hugging Face format.

For tests, demos and CI on machines with no model hub: same files as a real checkpoint
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json with the chat template).
"""
from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("out", help="directory to write")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--sliding-window", type=int, default=16,
                   help="window of the local layers (pattern LLLG); 0 for a dense model like the 1.2B")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def run(args) -> int:
    import torch

    from ..testing import make_random_checkpoint, tiny_config

    window = args.sliding_window or None
    config = tiny_config(num_hidden_layers=args.layers, hidden_size=args.hidden,
                         intermediate_size=2 * args.hidden, sliding_window=window,
                         sliding_window_pattern="LLLG" if window else None)
    path = make_random_checkpoint(args.out, config, seed=args.seed,
                                  dtype=getattr(torch, args.dtype), tokenizer=True)
    print(f"wrote a random tiny EXAONE 4.0 checkpoint to {path}")
    return 0
