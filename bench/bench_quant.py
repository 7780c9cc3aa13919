"""Quality and speed of weight-only int8/int4 (exaone.quant) against float32 and bfloat16.

    python bench/bench_quant.py [--layers N] [--steps 16] [--threads 2] [--skip-speed] [--model DIR]

Quality: logits of a tiny model, float32 vs quantized: relative error, top-1 agreement, mean
KL(float || quantized) per token, and the perplexity of 256 float-sampled tokens under each.
The model is a random tiny one (Student-t weights, as tests/test_quant.py) unless --model names a
checkpoint (e.g. the trained demo model); --text FILE measures on that text instead of the samples.

Speed: the EXAONE-4.0-1.2B shape (hidden 2048, 30 layers, 32/8 heads, head_dim 64, inter 4096,
vocab 102400, tied) with random weights; --layers shortens it. Batch-1 decode through model +
KVCache (`model(tok, position_ids=..., cache=cache, rows=slice(0, 1))`) after a 16-token
prompt. Each variant runs in its own process so that its peak RSS is its own. Printed: decode
tokens/s, weight bytes read per token, achieved GB/s (bytes x tokens/s), peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

SHAPE_1P2B = dict(vocab_size=102400, hidden_size=2048, intermediate_size=4096, num_hidden_layers=30,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=65536,
                  rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=True)
VARIANTS = {  # name -> (base dtype, quantize method, quantize lm_head)
    "float32": (torch.float32, None, False), "bfloat16": (torch.bfloat16, None, False),
    "int8": (torch.bfloat16, "int8", False), "int4": (torch.bfloat16, "int4", False),
    "int8+lm_head": (torch.bfloat16, "int8", True), "int4+lm_head": (torch.bfloat16, "int4", True),
}


# ---- quality ------------------------------------------------------------------------------------
def _tiny_random():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_quant import _model  # the same model the test bounds are measured on

    return _model(hidden=256), None


def _quality(args) -> list[dict]:
    from exaone.quant import quantize_model

    def fresh():
        if args.model:
            import exaone

            return exaone.load(args.model, dtype="float32"), exaone.load_tokenizer(args.model)
        return _tiny_random()

    ref_model, tok = fresh()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if args.text:
            with open(args.text, encoding="utf-8") as f:
                ids = torch.tensor([tok.encode(f.read())[:512]])
        else:  # text the float model itself finds likely: sample 256 tokens from it at temperature 1
            ids = torch.tensor([[ref_model.config.bos_token_id or 0]])
            for _ in range(255):
                p = ref_model(ids)[0, -1].softmax(-1)
                ids = torch.cat([ids, torch.multinomial(p, 1, generator=gen)[None]], 1)
        ref = ref_model(ids).float()
    rows = []

    def row(name, out):
        lp, lq = ref[0, :-1].log_softmax(-1), out[0, :-1].float().log_softmax(-1)
        nll = -lq.gather(-1, ids[0, 1:, None]).mean().item()
        rows.append(dict(variant=name, rel_err=((out - ref).norm() / ref.norm()).item(),
                         top1=(out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                         kl=(lp.exp() * (lp - lq)).sum(-1).mean().item(), ppl=float(torch.exp(torch.tensor(nll)))))

    row("float32", ref)
    with torch.no_grad():
        row("bfloat16 (weights and activations)", fresh()[0].to(torch.bfloat16)(ids).float())
        for method, group in (("int8", 128), ("int4", 32), ("int4", 128)):
            for lm in (False, True):
                q = quantize_model(fresh()[0], method, group_size=group, lm_head=lm)
                row(f"{method}{' g' + str(group) if method == 'int4' else ''}{' +lm_head' if lm else ''}", q(ids))
    return rows


# ---- speed --------------------------------------------------------------------------------------
def _build(layers: int, dtype: torch.dtype):
    """The 1.2B shape, weights N(0, 0.02) tiled from one random pool (fast), norms 1."""
    from exaone.config import Exaone4Config
    from exaone.model import Exaone4ForCausalLM

    config = Exaone4Config(**{**SHAPE_1P2B, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = Exaone4ForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 22, generator=gen) * 0.02).to(dtype)
    state = {}
    for name, p in model.named_parameters():
        t = torch.ones(p.shape, dtype=dtype) if name.endswith("norm.weight") else torch.empty(p.shape, dtype=dtype)
        if not name.endswith("norm.weight"):
            flat = t.view(-1)
            for s in range(0, flat.numel(), pool.numel() // 2):
                n = min(pool.numel() // 2, flat.numel() - s)
                o = int(torch.randint(0, pool.numel() // 2, (1,), generator=gen))
                flat[s:s + n].copy_(pool[o:o + n])
        state[name] = t
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.reset_rope()
    return model.eval().requires_grad_(False)


def _speed_child(args) -> dict:
    from exaone.quant import quantize_model, weight_bytes

    torch.set_num_threads(args.threads)
    dtype, method, lm = VARIANTS[args._child]
    model = _build(args.layers, dtype)
    if method:
        model = quantize_model(model, method, group_size=128, lm_head=lm)
    prompt = 16
    ids = torch.randint(0, SHAPE_1P2B["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        best = float("inf")
        for _ in range(args.repeats):
            cache = model.make_cache(rows=1, max_len=prompt + args.steps + 1)
            logits = model(ids, position_ids=torch.arange(prompt)[None], cache=cache, rows=slice(0, 1), last_only=True)
            tok = logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for i in range(args.steps):
                logits = model(tok, position_ids=torch.tensor([[prompt + i]]), cache=cache, rows=slice(0, 1))
                tok = logits[:, -1:].argmax(-1)
            best = min(best, time.perf_counter() - t)
    tps = args.steps / best
    wb = weight_bytes(model)
    return dict(variant=args._child, tokens_per_s=tps, weight_bytes=wb, gb_per_s=wb * tps / 1e9,
                peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _speed(args) -> list[dict]:
    rows = []
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, "--_child", v, "--layers", str(args.layers), "--steps", str(args.steps),
               "--threads", str(args.threads), "--repeats", str(args.repeats)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            rows.append(dict(variant=v, error=r.returncode))
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(_speed_line(rows[-1]), flush=True)
    return rows


def _speed_line(r: dict) -> str:
    if "error" in r:
        return f"{r['variant']:<14} failed (exit {r['error']})"
    return (f"{r['variant']:<14} {r['tokens_per_s']:7.2f} tok/s  {r['weight_bytes'] / 1e9:6.3f} GB/token  "
            f"{r['gb_per_s']:6.2f} GB/s  peak RSS {r['peak_rss'] / 1e9:5.2f} GB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=30, help="decoder layers of the 1.2B shape (default 30)")
    p.add_argument("--steps", type=int, default=16, help="decode steps timed (default 16)")
    p.add_argument("--repeats", type=int, default=2, help="best of this many decode runs (default 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--model", help="checkpoint for the quality part (default: a random tiny model)")
    p.add_argument("--text", help="with --model: measure on this text file (default: 256 tokens sampled from the float model)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(_speed_child(args)))
        return 0
    torch.set_num_threads(args.threads)
    out = {"torch": torch.__version__, "threads": args.threads, "layers": args.layers}
    if not args.skip_quality:
        out["quality"] = _quality(args)
        print(f"quality ({args.model or 'random tiny model, Student-t weights, hidden 256'}):")
        for r in out["quality"]:
            print(f"  {r['variant']:<32} rel err {r['rel_err']:6.4f}  top-1 {r['top1']:5.3f}  "
                  f"KL {r['kl']:7.5f}  ppl {r['ppl']:8.3f}")
    if not args.skip_speed:
        print(f"decode speed, 1.2B shape with {args.layers} layers, batch 1, {args.threads} threads, "
              f"best of {args.repeats} x {args.steps} steps:", flush=True)
        out["speed"] = _speed(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
