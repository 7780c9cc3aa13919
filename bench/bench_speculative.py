"""Speculative decoding speed-up through the engine (`Engine(target, draft_model=draft)`), on
random-weight models.

    python bench/bench_speculative.py [--hidden 768] [--layers 12] [--draft-layers 2] [--tail-scale 0.03]
        [--drafts trunc,trunc-int4,int4,bf16] [--k 2,4,6] [--tokens 64] [--prompt 128] [--repeats 3] [--threads 2]

Target: a hybrid (LLLG) random model of the given shape, float32. Random weights give no small
model that agrees with them, so the target is built to have one: the post-norm weights of its
layers past `--draft-layers` are scaled by `--tail-scale`, so those layers nudge the residual
stream instead of rewriting it (a trained model's later layers refine, too; this is a stand-in,
not a claim about real drafts). Drafts: `trunc` (the target's first `--draft-layers` layers, its
final norm and lm_head), `trunc-int4` (that, int4), `int4` / `int8` (exaone.quant.quantize_model
of a bf16 copy of the whole target), `bf16` (a bfloat16 copy).

Both sides are one greedy request (`ignore_eos`) on a batch-1 engine without prefix cache (a
repeat must prefill again): `Engine(target)` against `Engine(target, draft_model=draft,
num_speculative_tokens=k)`; every speculative run is checked token for token against the plain
engine's. Plain and speculative runs are interleaved and the median of `--repeats` is printed,
since the machine may be shared. Printed per draft and k: acceptance rate and tokens per target
verify pass (Engine.stats().speculative), decode tok/s after the first token (both sides; the
draft's catch-up on the prompt falls in it), whole-request tok/s, the speed-ups, GB/s of weights
read (target and draft passes, prefill included, over the request's time), peak RSS.
"""
from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time

import torch

from exaone.config import Exaone4Config
from exaone.engine import Engine
from exaone.model import Exaone4ForCausalLM
from exaone.sampling import SamplingParams


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


class _Run:
    """One request on `engine`: tokens, whole and decode-only times, and the passes it made."""

    def __init__(self, engine: Engine, prompt: list[int], tokens: int):
        before = engine.stats()
        t = time.perf_counter()
        outs = engine.submit(prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)).outputs()
        self.total = time.perf_counter() - t
        after = engine.stats()
        self.tokens = [o.token_id for o in outs]
        self.decode = outs[-1].elapsed - outs[-1].time_to_first_token  # tokens 2.. after the first
        self.target_passes = (after.decode_steps + after.prefill_chunks) - (before.decode_steps + before.prefill_chunks)
        sb, sa = before.speculative, after.speculative
        self.draft_passes = sa.draft_passes - sb.draft_passes if sa else 0


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
    max_len = args.prompt + args.tokens + 8
    engine = lambda **kw: Engine(target, max_batch=1, max_len=max_len, prefix_cache_bytes=0, **kw)  # noqa: E731
    plain_engine = engine()
    _Run(plain_engine, prompt, 4)  # warm-up
    ref = _Run(plain_engine, prompt, args.tokens).tokens
    tb = _weight_bytes(target)
    print(f"target: hidden {args.hidden}, {args.layers} layers (LLLG, window {args.window}, layers past "
          f"{args.draft_layers} post-norms x{args.tail_scale}), vocab {args.vocab}, float32, {tb / 1e6:.0f} MB of "
          f"weights read per pass; prompt {args.prompt}, {args.tokens} tokens, {torch.get_num_threads()} threads, "
          f"batch-1 engine, median of {args.repeats}")
    print("| draft | draft MB | k | acceptance | tokens/pass | decode tok/s | plain decode tok/s | decode speed-up "
          "| request speed-up | GB/s | exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in args.drafts.split(","):
        draft = _draft(target, kind, args.draft_layers)
        db = _weight_bytes(draft)
        _Run(engine(draft_model=draft, num_speculative_tokens=2), prompt, 4)  # warm-up (kernels, allocator)
        for k in (int(x) for x in args.k.split(",")):
            spec_engine = engine(draft_model=draft, num_speculative_tokens=k)
            plain, spec = [], []
            for _ in range(args.repeats):
                plain.append(_Run(plain_engine, prompt, args.tokens))
                spec.append(_Run(spec_engine, prompt, args.tokens))
            med = lambda runs, f: statistics.median(f(r) for r in runs)  # noqa: E731
            n = args.tokens - 1
            pd, sd = med(plain, lambda r: r.decode), med(spec, lambda r: r.decode)
            pt, stt = med(plain, lambda r: r.total), med(spec, lambda r: r.total)
            st = spec_engine.stats().speculative
            r = spec[-1]
            gbs = (tb * r.target_passes + db * r.draft_passes) / stt / 1e9
            exact = all(x.tokens == ref for x in spec + plain)
            print(f"| {kind} | {db / 1e6:.0f} | {k} | {st.acceptance_rate:.2f} | {st.tokens_per_round:.2f} | "
                  f"{n / sd:.1f} | {n / pd:.1f} | {pd / sd:.2f}x | {pt / stt:.2f}x | {gbs:.1f} | "
                  f"{'yes' if exact else 'NO'} |", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
