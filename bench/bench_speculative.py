"""Speculative decoding speed-up on random-weight models (exaone.speculative).

    python bench/bench_speculative.py [--hidden 768] [--layers 12] [--draft-layers 2] [--tail-scale 0.03]
        [--drafts trunc,trunc-int4,int4,bf16] [--k 2,4,6] [--tokens 64] [--prompt 128] [--repeats 3] [--threads 1]

Target: a hybrid (LLLG) random model of the given shape, float32. Random weights give no small
model that agrees with them, so the target is built to have one: the post-norm weights of its
layers past `--draft-layers` are scaled by `--tail-scale`, so those layers nudge the residual
stream instead of rewriting it (a trained model's later layers refine, too; this is a stand-in,
not a claim about real drafts). Drafts: `trunc` (the target's first `--draft-layers` layers, its
final norm and lm_head), `trunc-int4` (that, int4), `int4` / `int8` (exaone.quant.quantize_model
of a bf16 copy of the whole target), `bf16` (a bfloat16 copy). Every run is checked token for
token against plain cached greedy decoding of the target (`exaone.generate.generate`). Plain
and speculative runs are interleaved and the median of `--repeats` is printed, since the machine
may be shared. Printed per draft and k: acceptance rate, tokens per target pass (the prompt's
included), tokens/s, speed-up, GB/s of weights read (target and draft), peak RSS.
"""
from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time

import torch

from exaone.config import Exaone4Config
from exaone.generate import generate
from exaone.model import Exaone4ForCausalLM
from exaone.speculative import speculative_generate


def _weight_bytes(model) -> int:
    try:
        from exaone.quant import weight_bytes
        return weight_bytes(model)
    except ImportError:
        emb = model.model.embed_tokens.weight
        return sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)


def _target(args) -> Exaone4ForCausalLM:
    cfg = Exaone4Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                        num_key_value_heads=max(1, args.hidden // 256), head_dim=64,
                        max_position_embeddings=4096, sliding_window=args.window, sliding_window_pattern="LLLG",
                        bos_token_id=1, eos_token_id=2)
    model = Exaone4ForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # std init/sqrt(fan_in) keeps activations O(1); norms 1 + noise
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            fan = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else args.init * noise / fan ** 0.5)
        for layer in model.model.layers[args.draft_layers:]:
            layer.post_attention_layernorm.weight.mul_(args.tail_scale)
            layer.post_feedforward_layernorm.weight.mul_(args.tail_scale)
    return model


def _draft(target, kind: str, n_layers: int):
    if kind.startswith("trunc"):
        cfg = copy.deepcopy(target.config)
        cfg.num_hidden_layers = n_layers
        cfg.layer_types = cfg.layer_types[:n_layers]
        d = Exaone4ForCausalLM(cfg).eval()
        missing = d.load_state_dict(target.state_dict(), strict=False).missing_keys
        assert not missing, missing
        if kind == "trunc-int4":
            from exaone.quant import quantize_model
            d = quantize_model(d.to(torch.bfloat16), "int4")
        return d
    if kind == "bf16":
        return copy.deepcopy(target).to(torch.bfloat16)
    if kind in ("int4", "int8"):
        from exaone.quant import quantize_model
        return quantize_model(copy.deepcopy(target).to(torch.bfloat16), kind)
    raise ValueError(f"unknown draft {kind!r}")


def _time(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--init", type=float, default=1.0, help="weight std x sqrt(fan_in)")
    ap.add_argument("--drafts", default="trunc,trunc-int4,int4,bf16")
    ap.add_argument("--draft-layers", type=int, default=2)
    ap.add_argument("--tail-scale", type=float, default=0.03)
    ap.add_argument("--k", default="2,4,6")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target = _target(args)
    prompt = torch.randint(3, args.vocab, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    run_plain = lambda: generate(target, prompt, max_tokens=args.tokens)  # noqa: E731
    generate(target, prompt, max_tokens=4)  # warm-up
    ref = run_plain()
    tb = _weight_bytes(target)
    print(f"target: hidden {args.hidden}, {args.layers} layers (LLLG, window {args.window}, layers past "
          f"{args.draft_layers} post-norms x{args.tail_scale}), vocab {args.vocab}, "
          f"float32, {tb / 1e6:.0f} MB of weights read per pass; prompt {args.prompt}, {args.tokens} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("| draft | draft MB | k | acceptance | tokens/pass | tok/s | plain tok/s | speed-up | GB/s | exact |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in args.drafts.split(","):
        draft = _draft(target, kind, args.draft_layers)
        db = _weight_bytes(draft)
        speculative_generate(target, draft, prompt, 4, k=2)  # warm-up (kernels, allocator)
        for k in (int(x) for x in args.k.split(",")):
            plain, spec = [], []
            for _ in range(args.repeats):
                plain.append(_time(run_plain)[0])
                t, (toks, st) = _time(lambda: speculative_generate(target, draft, prompt, args.tokens, k=k))
                spec.append(t)
            tp, ts = statistics.median(plain), statistics.median(spec)
            n = len(toks)
            gbs = (tb * (st.target_passes + 1) + db * (st.draft_passes + 1)) / ts / 1e9
            print(f"| {kind} | {db / 1e6:.0f} | {k} | {st.acceptance_rate:.2f} | {st.tokens_per_pass:.2f} | "
                  f"{n / ts:.1f} | {len(ref) / tp:.1f} | {tp / ts:.2f}x | {gbs:.1f} | "
                  f"{'yes' if toks == ref else 'NO'} |", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
