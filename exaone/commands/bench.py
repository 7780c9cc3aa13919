"""`exaone bench` (= `python bench/bench_engine.py`): speed of the 1.2B shape against transformers.

Random weights (nothing is downloaded), EXAONE-4.0-1.2B shape, one table: prefill tokens/s,
decode tokens/s at batch 1 and aggregate at each concurrency, achieved weight-read GB/s per
decode row against the machine's measured read bandwidth, peak RSS; ours and transformers with
the same tensors, measured interleaved in one run (medians), so a busy machine slows both alike.
Peak memory is measured in one child process per (implementation, dtype), since RSS high-water
only grows; each child reads its own (VmHWM, see `peak_rss_bytes`). This module must not change the model: it only times it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

SHAPE_1P2B = dict(vocab_size=102400, hidden_size=2048, intermediate_size=4096, num_hidden_layers=30,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=65536,
                  rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=361, pad_token_id=0)
POOL = 1 << 22  # random values drawn once per model, tiled with random offsets: N(0, 0.02) at memcpy speed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill length (default: %(default)s)")
    p.add_argument("--context", type=int, default=32, help="prompt length of each decoding sequence (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=16, help="timed decode steps per run (default: %(default)s)")
    p.add_argument("--batches", default="1,4,16", help="concurrent sequences (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs per cell, median reported (default: %(default)s)")
    p.add_argument("--cell-budget", type=float, default=30.0,
                   help="stop repeating a cell of one implementation after this many seconds (default: %(default)s)")
    p.add_argument("--layers", type=int, default=None, help="shorten the model (default: 30, the 1.2B)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    p.add_argument("--skip-memory", action="store_true", help="do not measure peak RSS (saves the child processes)")
    p.add_argument("--no-engine", action="store_true", help="decode through model + cache even if exaone.engine exists")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--_child", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)


# ---- model -------------------------------------------------------------------------------
def bench_config(layers: int | None):
    from ..config import Exaone4Config

    return Exaone4Config(**{**SHAPE_1P2B, **({"num_hidden_layers": layers} if layers else {})})


def build_model(config, dtype, seed: int = 0):
    """Our model with weights ~ N(0, 0.02) (norms 1), allocated directly in `dtype`, where
    `exaone.load` puts a checkpoint's (`hugepages.empty`: 2 MB pages where the OS offers them)."""
    import torch

    from .. import hugepages
    from ..model import Exaone4ForCausalLM

    with torch.device("meta"):
        model = Exaone4ForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(2 * POOL, generator=gen).mul_(0.02).to(dtype)
    state = {}
    for name, p in model.named_parameters():  # tied weights are listed once
        if name.endswith("norm.weight"):
            state[name] = torch.ones(p.shape, dtype=dtype)
            continue
        t = state[name] = hugepages.empty(p.shape, dtype)
        flat = t.view(-1)
        for s in range(0, flat.numel(), POOL):
            n = min(POOL, flat.numel() - s)
            o = int(torch.randint(0, POOL, (1,), generator=gen))
            flat[s:s + n].copy_(pool[o:o + n])
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.reset_rope()
    return model.eval().requires_grad_(False)


def to_transformers(model):
    """transformers' Exaone4ForCausalLM holding the very same tensors (no copy)."""
    import torch
    from transformers import Exaone4Config as HFConfig
    from transformers import Exaone4ForCausalLM as HFModel

    d = model.config.to_dict()
    d.pop("torch_dtype", None)
    cfg = HFConfig(**d)
    cfg.dtype = model.dtype
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = HFModel(cfg)
    hf.load_state_dict(model.state_dict(), strict=True, assign=True)
    hf.tie_weights()
    # Non-persistent buffers (RoPE) were built on the meta device: rebuild them on the CPU.
    rotary = type(hf.model.rotary_emb)
    with torch.device("cpu"):
        hf.model.rotary_emb = rotary(config=cfg)
    for name, b in hf.named_buffers():
        if b.is_meta:
            raise RuntimeError(f"transformers buffer {name} is still on the meta device")
    return hf.eval().requires_grad_(False)


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every parameter once (the tied embedding is read by lm_head)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---- measurements ------------------------------------------------------------------------
def bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> dict:
    """Read (sum) and copy bandwidth over a `gib` GiB buffer, best of `repeats`, in GB/s.

    The buffers are in 2 MB pages where the weights are (`hugepages.empty`): the machine's
    streaming bandwidth, not one held back by a TLB miss every 4 KB (2-5 % lower here)."""
    import torch

    from .. import hugepages

    n = int(gib * (1 << 30)) // 4
    a = hugepages.empty((n,), torch.float32).fill_(1.0)
    b = hugepages.empty((n,), torch.float32)
    best_read = best_copy = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best_read = max(best_read, a.numel() * 4 / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        b.copy_(a)
        best_copy = max(best_copy, 2 * a.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return {"read": best_read, "copy": best_copy}


def bandwidth_around(fn, probe=None):
    """(fn()'s result, the read bandwidth around it): the mean of a probe just before and one just
    after, because a shared host's bandwidth drifts in seconds. `probe()` -> GB/s; default a
    short `bandwidth_gbs` read."""
    probe = probe or (lambda: bandwidth_gbs(repeats=3)["read"])
    before = probe()
    out = fn()
    return out, (before + probe()) / 2


def _prompt(rows: int, n: int, vocab: int, seed: int):
    import torch

    return torch.randint(10, vocab, (rows, n), generator=torch.Generator().manual_seed(seed))


class Ours:
    name = "ours"

    def __init__(self, model, use_engine: bool):
        self.model = model
        self.engine_cls = None
        if use_engine:
            try:
                from ..engine import Engine, SamplingParams  # noqa: F401
                self.engine_cls = Engine
            except ImportError:
                pass

    def prefill(self, ids) -> float:
        import torch

        with torch.inference_mode():
            cache = self.model.make_cache(rows=1, max_len=ids.shape[1] + 1)
            pos = torch.arange(ids.shape[1])[None]
            t = time.perf_counter()
            self.model(ids, position_ids=pos, cache=cache, last_only=True)
            return time.perf_counter() - t

    def decode(self, ids, steps: int) -> tuple[float, int]:
        """(seconds, tokens) of about `steps` decode steps of all rows of `ids` (prefill not counted)."""
        if self.engine_cls is not None:
            return self._decode_engine(ids, steps)
        import torch

        B, n = ids.shape
        with torch.inference_mode():
            cache = self.model.make_cache(rows=B, max_len=n + steps + 1)
            rows = slice(0, B)
            logits = self.model(ids, position_ids=torch.arange(n)[None].expand(B, n), cache=cache,
                                rows=rows, last_only=True)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for i in range(steps):
                logits = self.model(tok, position_ids=torch.full((B, 1), n + i), cache=cache, rows=rows)
                tok = logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - t, B * steps

    def _decode_engine(self, ids, steps: int) -> tuple[float, int]:
        from ..engine import Engine, SamplingParams

        B = ids.shape[0]
        # Sequences are admitted one prefill per step, so the first ones are ahead by up to B
        # tokens: max_tokens leaves room for that, and timing covers exactly `steps` steps at the
        # full batch (no sequence finishes inside the window).
        engine = Engine(self.model, max_batch=B, max_len=ids.shape[1] + steps + B + 2, prefix_cache_bytes=0)
        params = SamplingParams(temperature=0.0, max_tokens=steps + B + 1, ignore_eos=True)
        handles = [engine.submit(ids[i].tolist(), params) for i in range(B)]
        seen = [0] * B
        while not all(s >= 1 for s in seen):
            engine.step()
            for i, h in enumerate(handles):
                seen[i] += len(_drain(h))
        t, before = time.perf_counter(), sum(seen)
        for _ in range(steps):
            engine.step()
        sec = time.perf_counter() - t
        for i, h in enumerate(handles):
            seen[i] += len(_drain(h))
        for h in handles:
            h.cancel()
        engine.step()  # applies the cancellations
        return sec, sum(seen) - before


def _drain(handle) -> list:
    """Records a handle has ready now, without blocking."""
    out = []
    while True:
        r = handle.get_nowait()
        if r is None:
            return out
        if getattr(r, "token_id", None) is not None:
            out.append(r)


class Reference:
    name = "transformers"

    def __init__(self, model):
        self.model = to_transformers(model)

    def prefill(self, ids) -> float:
        import torch

        with torch.inference_mode():
            t = time.perf_counter()
            self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - t

    def decode(self, ids, steps: int) -> tuple[float, int]:
        import torch

        stamps = []

        class Streamer:  # generate calls put() with the prompt, then once per new token
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        with torch.inference_mode():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1,
                                min_new_tokens=steps + 1, do_sample=False, streamer=Streamer(),
                                pad_token_id=0)
        # stamps: prompt, token 1 (after prefill), ..., token steps + 1
        return stamps[-1] - stamps[1], ids.shape[0] * (len(stamps) - 2)


# ---- the run -----------------------------------------------------------------------------
def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[name]


def peak_rss_bytes() -> int:
    """This process's own RSS high-water mark, in bytes.

    Linux: VmHWM of /proc/self/status. Not ru_maxrss: exec keeps the forking parent's high-water
    mark in it (fs/exec.c), so a child of the big bench process read the parent's peak (9.9 GB in
    every cell). Elsewhere ru_maxrss, the best there is (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _child(args) -> int:
    """Peak RSS of one implementation: build, prefill prompt_len, decode the largest batch."""
    import torch

    torch.set_num_threads(args.threads)
    impl, dtype = args._child
    config = bench_config(args.layers)
    model = build_model(config, _dtype(dtype))
    runner = Ours(model, not args.no_engine) if impl == "ours" else Reference(model)
    del model
    runner.prefill(_prompt(1, args.prompt_len, config.vocab_size, 0))
    B = max(int(b) for b in args.batches.split(","))
    runner.decode(_prompt(B, args.context, config.vocab_size, 1), 2)
    print(json.dumps({"peak_rss": peak_rss_bytes()}))
    return 0


def _measure_memory(args, impls: list[str], dtype: str) -> dict[str, float]:
    """Peak RSS in bytes per implementation, each from its own child process."""
    procs = {}
    for impl in impls:
        cmd = [sys.executable, "-m", "exaone.commands.bench", "--_child", impl, dtype,
               "--prompt-len", str(args.prompt_len), "--context", str(args.context), "--batches", args.batches,
               "--threads", str(args.threads)] + (["--layers", str(args.layers)] if args.layers else []) \
            + (["--no-engine"] if args.no_engine else [])
        procs[impl] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for impl, p in procs.items():
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            print(f"memory child {impl} {dtype} failed:\n{stderr[-2000:]}", file=sys.stderr)
            continue
        out[impl] = float(json.loads(stdout.strip().splitlines()[-1])["peak_rss"])
    return out


def _median_interleaved(runners, fn, repeats: int, budget: float) -> dict[str, float]:
    """Median rate per runner; fn(runner) -> (seconds, tokens). Runners alternate within a repeat;
    a runner whose cell has already taken `budget` seconds is not repeated (slow cells, busy machines)."""
    rates: dict[str, list[float]] = {r.name: [] for r in runners}
    spent = {r.name: 0.0 for r in runners}
    for _ in range(repeats):
        for r in runners:
            if spent[r.name] >= budget:
                continue
            t = time.perf_counter()
            sec, tokens = fn(r)
            spent[r.name] += time.perf_counter() - t
            rates[r.name].append(tokens / sec)
    return {k: statistics.median(v) for k, v in rates.items()}


def _commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=here).stdout.strip() or None
    except OSError:
        return None


def _cpu_model() -> str:
    from ..kernels._ext import cpuinfo

    return cpuinfo("model name") or platform.processor()


def run(args) -> int:
    if args._child:
        return _child(args)
    import torch

    torch.set_num_threads(args.threads)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    config = bench_config(args.layers)
    impls = ["ours"] + ([] if args.skip_hf else ["transformers"])
    t_start = time.perf_counter()

    bw = bandwidth_gbs()
    results = []
    for dtype in dtypes:
        more = bandwidth_gbs()  # again per dtype: the best seen is the machine's, not the moment's
        bw = {k: max(bw[k], more[k]) for k in bw}
        model = build_model(config, _dtype(dtype))
        wbytes = weight_bytes(model)
        runners = [Ours(model, not args.no_engine)] + ([] if args.skip_hf else [Reference(model)])
        ceiling = bw["read"] * 1e9 / wbytes
        row = dict(dtype=dtype, weight_bytes=wbytes, ceiling_tps=ceiling, cells=[])
        prompt = _prompt(1, args.prompt_len, config.vocab_size, 0)
        for r in runners:  # warm-up: first calls pay for allocation and kernel selection
            r.prefill(prompt[:, :16])
            r.decode(_prompt(1, 4, config.vocab_size, 1), 2)
        tps = _median_interleaved(runners, lambda r: (r.prefill(prompt), args.prompt_len), args.repeats, args.cell_budget)
        row["cells"].append(dict(metric=f"prefill {args.prompt_len}", unit="tok/s", **tps))
        _progress(dtype, row["cells"][-1])
        for B in batches:
            ids = _prompt(B, args.context, config.vocab_size, B)
            shares = []  # batch 1: our achieved GB/s over the read bandwidth measured around it

            def decode(r, ids=ids, B=B, shares=shares):
                if B != 1 or r.name != "ours":
                    return r.decode(ids, args.decode_tokens)
                (sec, tokens), around = bandwidth_around(lambda: r.decode(ids, args.decode_tokens))
                shares.append(wbytes * tokens / sec / 1e9 / around)
                return sec, tokens

            tps = _median_interleaved(runners, decode, args.repeats, args.cell_budget)
            if shares:
                row["adjacent_share"] = statistics.median(shares)
            row["cells"].append(dict(metric=f"decode batch {B}", unit="tok/s", batch=B, **tps,
                                     gbs={k: wbytes * v / B / 1e9 for k, v in tps.items()}))
            _progress(dtype, row["cells"][-1])
        results.append(row)
        del runners, model
    # Peak RSS last, one child per (implementation, dtype); the two of a dtype run side by side
    # (timings are done, and RSS does not depend on speed).
    for row in results:
        mem = _measure_memory(args, impls, row["dtype"]) if not args.skip_memory else {}
        row["cells"].append(dict(metric="peak RSS", unit="GB", **{i: mem.get(i, float("nan")) / 1e9 for i in impls}))
        _progress(row["dtype"], row["cells"][-1])
    for row in results:  # against the best bandwidth seen in the run
        row["ceiling_tps"] = bw["read"] * 1e9 / row["weight_bytes"]
    elapsed = time.perf_counter() - t_start

    print(_table(results, impls, bw, args, config))
    print(f"({elapsed:.0f} s; {args.threads} threads; {_cpu_model()}; commit {_commit()})")
    if args.json:
        out = dict(commit=_commit(), cpu=_cpu_model(), threads=args.threads, bandwidth_gbs=bw,
                   layers=config.num_hidden_layers, engine=runners_engine(args),
                   settings={k: v for k, v in vars(args).items() if k not in ("_child", "func")},
                   results=results, seconds=elapsed)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def _progress(dtype: str, cell: dict) -> None:
    vals = ", ".join(f"{k} {v:.2f}" for k, v in cell.items() if isinstance(v, float))
    print(f"  {dtype} {cell['metric']}: {vals} {cell['unit']}", file=sys.stderr, flush=True)


def runners_engine(args) -> bool:
    if args.no_engine:
        return False
    try:
        from ..engine import Engine  # noqa: F401
        return True
    except ImportError:
        return False


def _num(v: float, fmt: str) -> str:
    return "-" if v != v else fmt.format(v)  # NaN (not measured) -> "-"


def _table(results, impls, bw, args, config) -> str:
    hf = "transformers" in impls
    head = ["dtype", "metric", "ours", "GB/s"] + (["transformers", "GB/s", "ours/hf"] if hf else []) + ["x batch 1"]
    lines = []
    for row in results:
        single = next((c["ours"] for c in row["cells"] if c.get("batch") == 1), None)
        for c in row["cells"]:
            unit = c["unit"]
            cells = [row["dtype"], f"{c['metric']} ({unit})", _num(c["ours"], "{:.2f}"),
                     _num(c["gbs"]["ours"], "{:.1f}") if "gbs" in c else ""]
            if hf:
                cells += [_num(c["transformers"], "{:.2f}"),
                          _num(c["gbs"]["transformers"], "{:.1f}") if "gbs" in c else "",
                          _num(c["ours"] / c["transformers"], "{:.2f}x")]
            cells.append(_num(c["ours"] / single, "{:.1f}x") if c.get("batch") and single else "")
            lines.append(cells)
        lines.append([row["dtype"], "ceiling batch 1 (tok/s)", f"{row['ceiling_tps']:.2f}",
                      f"{bw['read']:.1f}"] + (["", "", ""] if hf else []) + [""])
        if "adjacent_share" in row:  # the bandwidth varies on a shared host: also against the moment's
            lines.append([row["dtype"], "batch 1 / bw around it", f"{100 * row['adjacent_share']:.0f}%", ""]
                         + (["", "", ""] if hf else []) + [""])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cs: "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cs, widths)))  # noqa: E731
    title = (f"EXAONE 4.0 1.2B shape ({config.num_hidden_layers} layers, random weights): prefill "
             f"{args.prompt_len} tokens; decode {args.decode_tokens} steps after a {args.context}-token prompt; "
             f"median of {args.repeats}; read bandwidth {bw['read']:.1f} GB/s (copy {bw['copy']:.1f})")
    return "\n".join([title, fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_engine", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
