"""Quality and speed of weight-only int8/int4 (exaone.quant) against float32, bfloat16,
transformers and llama.cpp.

    python bench/bench_quant.py [--skip-quality] [--rows R1,R2,...] [--layers N] [--repeats 3] [--rounds 1] [--json out.json]
    python bench/bench_quant.py --merge a.json b.json [--json all.json]   # one table from split runs

Quality: logits of a tiny model, float32 vs quantized: relative error, top-1 agreement, mean
KL(float || quantized) per token, and the perplexity of 256 float-sampled tokens under each.
The model is a random tiny one (Student-t weights, as tests/test_quant.py) unless --model names a
checkpoint (e.g. the trained demo model); --text FILE measures on that text instead of the samples.

Speed: one table over the EXAONE-4.0-1.2B shape with random weights, built by
exaone.commands.bench (same seed for every row, so all rows hold the same weights up to their own
rounding); --layers shortens it, --tiny swaps in a small shape for tests. Rows: ours float32 /
bfloat16 / int8 / int4 (group 128; the VNNI kernel with int8 activations; lm_head int8, as
quantize_model's default; variants: +int4_head, +bf16_head, @f32 = a float32 model around the
int linears (attention, norms and KV cache in float32), and -torch = torch's weight-only
kernels with bfloat16 activations and a bfloat16 lm_head, what the int rows were before), transformers
float32 / bfloat16 (the very same tensors), llama.cpp F16 / Q8_0 / Q4_K_M through
llama-cpp-python: F16 is `exaone export --format gguf` of the bfloat16 weights, Q8_0 and Q4_K_M
are llama.cpp's own quantizer (`llama_model_quantize`) run on that file. Columns: weight bytes
read per decode token, prefill tok/s (one pass over --prompt-len tokens), batch-1 greedy decode
tok/s (--decode-tokens steps after a --context-token prompt, timed from the first generated token;
nothing stops at EOS), achieved GB/s = weight bytes x decode tok/s and its share of the best read
bandwidth measured in the run ("% of bw") and, median over the decode runs, of the mean of read
probes just before and after each run ("% of bw around": the host's bandwidth drifts), peak RSS, and ratios of each of our rows against its
llama.cpp match (int8 : Q8_0, int4 : Q4_K_M, float32 and bfloat16 : F16) and its transformers match
(same dtype; bfloat16 for int8/int4). Medians of --repeats (with --rounds R, each row's process runs R
times, rows taking turns, and the median pools all R x repeats runs: on a machine whose bandwidth
drifts, the rows then share the drift instead of each getting its own moment). Every row runs in its own process (its
peak RSS is its own, one model in memory at a time); the GGUF files live in a temporary directory
that is deleted at the end; every implementation gets the same prompt token ids.
This script only times and compares; it must not change the model.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

OURS = {  # row -> (base dtype, quantize method, lm_head, backend); None backend: the default (VNNI)
    "float32": (torch.float32, None, False, None), "bfloat16": (torch.bfloat16, None, False, None),
    "int8": (torch.bfloat16, "int8", "int8", None), "int4": (torch.bfloat16, "int4", "int8", None),
    "int4+int4_head": (torch.bfloat16, "int4", "int4", None),
    # float32 for everything but the quantized linears (norms, attention, KV cache, embedding)
    "int8@f32": (torch.float32, "int8", "int8", None), "int4@f32": (torch.float32, "int4", "int8", None),
    "int8+bf16_head": (torch.bfloat16, "int8", False, None), "int4+bf16_head": (torch.bfloat16, "int4", False, None),
    # before the VNNI kernel: torch's weight-only kernels, bfloat16 lm_head
    "int8-torch": (torch.bfloat16, "int8", False, "torch"), "int4-torch": (torch.bfloat16, "int4", False, "torch"),
}
HF = {"hf-float32": torch.float32, "hf-bfloat16": torch.bfloat16}
LLAMA = {"llama-F16": None, "llama-Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "llama-Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
ROWS = [*OURS, *HF, *LLAMA]
DEFAULT_ROWS = "float32,bfloat16,int8,int4,hf-float32,hf-bfloat16,llama-F16,llama-Q8_0,llama-Q4_K_M"
MATCH = {"float32": ("llama-F16", "hf-float32"), "bfloat16": ("llama-F16", "hf-bfloat16"),
         **{r: ("llama-Q8_0" if r.startswith("int8") else "llama-Q4_K_M", "hf-bfloat16") for r in OURS if r.startswith("int")}}
# --tiny: small enough for a test, rows a multiple of 256 so that llama.cpp's k-quants apply
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            vocab_size=4096)


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
            for lm in (False, "int8", "int4"):
                for backend in ("torch", None):
                    if backend == "torch" and lm:
                        continue
                    q = quantize_model(fresh()[0], method, group_size=group, lm_head=lm, backend=backend)
                    row(f"{method}{' g' + str(group) if method == 'int4' else ''} {lm or 'float'} lm_head"
                        f"{' (torch kernels)' if backend else ''}", q(ids))
    return rows


# ---- speed: the rows ------------------------------------------------------------------------------
def _config(args):
    from exaone.commands.bench import bench_config

    config = bench_config(args.layers)
    return dataclasses.replace(config, **TINY, num_hidden_layers=args.layers or 2) if args.tiny else config


class LlamaCpp:
    """llama-cpp-python on a GGUF file, greedy, batch 1: the same prefill/decode interface as
    exaone.commands.bench's Ours and Reference (ids: a (1, n) tensor)."""
    name = "llama.cpp"

    def __init__(self, path, threads: int, n_ctx: int):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=512, n_ubatch=512, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _argmax(self) -> int:  # logits of the last evaluated token
        p = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.ctypeslib.as_array(p, shape=(self.n_vocab,)).argmax())

    def prefill(self, ids) -> float:
        self.llm.reset()  # the next eval drops the KV cache from position 0
        t = time.perf_counter()
        self.llm.eval(ids[0].tolist())  # in chunks of n_batch = 512
        return time.perf_counter() - t

    def decode(self, ids, steps: int) -> tuple[float, int]:
        """Greedy token by token; eval never stops at EOS (that is generate()'s doing)."""
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        tok = self._argmax()
        t = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([tok])
            tok = self._argmax()
        return time.perf_counter() - t, steps


def gguf_summary(path) -> dict:
    """Bytes a decode step reads from a GGUF file (every tensor; the embedding only when it is also
    the output matrix, i.e. no output.weight) and the tensor-type count."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    untied = any(t.name == "output.weight" for t in tensors)
    types: dict[str, int] = {}
    for t in tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return dict(weight_bytes=sum(int(t.n_bytes) for t in tensors if not (untied and t.name == "token_embd.weight")),
                file_bytes=os.path.getsize(path), tensor_types=types,
                token_embd=next(t.tensor_type.name for t in tensors if t.name == "token_embd.weight"))


def llama_quantize(src, dst, ftype_name: str, threads: int) -> None:
    """llama.cpp's own quantizer (what `llama-quantize` runs) on a GGUF file."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype_name}) returned {rc}")


def _gguf_child(args) -> dict:
    """Write the GGUF files of the rows asked for into args._gguf: our F16 export of the bfloat16
    weights (through a checkpoint directory with a small tokenizer), then llama.cpp's quantizer."""
    from exaone.commands.bench import build_model
    from exaone.export_gguf import export_gguf
    from exaone.loader import save
    from exaone.tokenizer_build import build_tokenizer

    out, config = Path(args._gguf), _config(args)
    ckpt = out / "checkpoint"
    tok = build_tokenizer(out_dir=ckpt)  # fewer ids than the vocabulary: the rest become [PADn]
    if len(tok) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} ids, more than the bench vocabulary {config.vocab_size}")
    save(build_model(config, torch.bfloat16), ckpt)
    seconds = {}
    t = time.perf_counter()
    export_gguf(ckpt, out / "llama-F16.gguf", outtype="f16")
    seconds["llama-F16"] = time.perf_counter() - t
    shutil.rmtree(ckpt)
    for row in args.rows.split(","):
        if LLAMA.get(row):
            t = time.perf_counter()
            llama_quantize(out / "llama-F16.gguf", out / f"{row}.gguf", LLAMA[row], args.threads)
            seconds[row] = time.perf_counter() - t
    return dict(seconds=seconds)


def _median_rate(fn, repeats: int, budget: float) -> tuple[float, list[float]]:
    """Median of fn() -> (seconds, tokens) as tokens/s over `repeats` runs; no new run once the
    cell has taken `budget` seconds (slow cells)."""
    rates, spent = [], 0.0
    for _ in range(repeats):
        if rates and spent >= budget:
            break
        sec, tokens = fn()
        spent += sec
        rates.append(tokens / sec)
    return statistics.median(rates), rates


def _speed_child(args) -> dict:
    from exaone.commands.bench import Ours, Reference, _prompt, bandwidth_around, bandwidth_gbs, build_model
    from exaone.quant import quantize_model, weight_bytes

    torch.set_num_threads(args.threads)
    row, config = args._child, _config(args)
    info = {}
    if row in LLAMA:
        path = Path(args._gguf) / f"{row}.gguf"
        info = gguf_summary(path)
        runner = LlamaCpp(path, args.threads, n_ctx=max(args.prompt_len, args.context + args.decode_tokens) + 8)
    else:
        dtype, method, lm, backend = OURS.get(row) or (HF[row], None, False, None)
        model = build_model(config, dtype)
        if method:
            model = quantize_model(model, method, group_size=128, lm_head=lm, backend=backend)
        info["weight_bytes"] = weight_bytes(model)
        runner = Reference(model) if row in HF else Ours(model, not args.no_engine)
        del model
    prompt = _prompt(1, args.prompt_len, config.vocab_size, 0)  # the same ids for every row
    context = _prompt(1, args.context, config.vocab_size, 1)
    with torch.inference_mode():
        # Warm-up at the timed length: allocations, and oneDNN's primitives for this shape (a first
        # 512-token fp32 prefill ran at ~100 tok/s against ~150 after; with --repeats 1 it was the result).
        runner.prefill(prompt)
        runner.decode(context[:, :4], 2)
        prefill, prefill_runs = _median_rate(lambda: (runner.prefill(prompt), args.prompt_len), args.repeats,
                                             args.cell_budget)
        shares, peak = [], {"max": 0, "ok": True}  # decode runs' GB/s over the bandwidth just before and after

        def probe() -> float:
            """Read bandwidth now; its 2 GiB of buffers do not count in the row's peak RSS."""
            peak["max"] = max(peak["max"], _peak_rss())
            bw = bandwidth_gbs(repeats=3)["read"]
            peak["ok"] &= _reset_peak_rss()  # else no peak is reported rather than the probe's
            return bw

        def decode():
            (sec, tokens), around = bandwidth_around(lambda: runner.decode(context, args.decode_tokens), probe)
            shares.append(info["weight_bytes"] * tokens / sec / 1e9 / around)
            return sec, tokens
        decode, decode_runs = _median_rate(decode, args.repeats, args.cell_budget)
    return dict(row=row, impl=runner.name, **info, prefill_tps=prefill, prefill_runs=prefill_runs,
                decode_tps=decode, decode_runs=decode_runs, gb_per_s=info["weight_bytes"] * decode / 1e9,
                bw_shares=shares, peak_rss=max(peak["max"], _peak_rss()) if peak["ok"] else None)


def _peak_rss() -> int:
    """This process's peak RSS in bytes. VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork
    and exec, so a child would report its parent's high-water mark when that is larger."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    """Set this process's peak RSS (VmHWM) back to its current RSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- speed: the run -------------------------------------------------------------------------------
def _run_child(args, child: str, gguf_dir) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", child, "--_gguf", str(gguf_dir), "--rows", args.rows,
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--prompt-len", str(args.prompt_len),
           "--context", str(args.context), "--decode-tokens", str(args.decode_tokens),
           "--cell-budget", str(args.cell_budget)]
    cmd += (["--layers", str(args.layers)] if args.layers else []) + (["--tiny"] if args.tiny else []) \
        + (["--no-engine"] if args.no_engine else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        print(f"{child} failed (exit {r.returncode}):\n{r.stderr[-3000:]}", file=sys.stderr)
        return dict(row=child, error=r.returncode)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _speed(args) -> dict:
    from exaone.commands.bench import _commit, _cpu_model, bandwidth_gbs

    rows = args.rows.split(",")
    t0 = time.perf_counter()
    bw = bandwidth_gbs()
    results, prep = [], None
    with tempfile.TemporaryDirectory(prefix="bench_quant_gguf_") as tmp:
        if any(r in LLAMA for r in rows):
            prep = _run_child(args, "gguf", tmp)
            print(f"GGUF files written in {sum(prep.get('seconds', {}).values()):.0f} s", file=sys.stderr, flush=True)
        runs: dict[str, list[dict]] = {row: [] for row in rows}
        for i in range(args.rounds):  # rows take turns, so a drifting machine hits all of them alike
            for row in rows:
                runs[row].append(_run_child(args, row, tmp))
                print(("" if args.rounds == 1 else f"[round {i + 1}] ") + _row_line(runs[row][-1]),
                      file=sys.stderr, flush=True)
                if args.json:  # rows so far survive a run that is stopped
                    with open(args.json + ".partial", "w") as f:
                        json.dump(runs, f, indent=2)
            if i + 1 < args.rounds:
                more = bandwidth_gbs()
                bw = {k: max(bw[k], more[k]) for k in bw}
        results = [_pool(r) for r in runs.values()]
    more = bandwidth_gbs()  # again at the end: the best seen is the machine's, not the moment's
    config = _config(args)
    return dict(rows=results, gguf=prep, bandwidth_gbs={k: max(bw[k], more[k]) for k in bw},
                commit=_commit(), cpu=_cpu_model(), threads=args.threads, layers=config.num_hidden_layers,
                shape="tiny" if args.tiny else "EXAONE-4.0-1.2B", prompt_len=args.prompt_len, context=args.context,
                decode_tokens=args.decode_tokens, repeats=args.repeats * args.rounds, rounds=args.rounds,
                engine=not args.no_engine, seconds=time.perf_counter() - t0)


def _pool(runs: list[dict]) -> dict:
    """One row's processes (one per round) as one result: medians over all their runs, the
    largest peak RSS."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    for k in ("prefill", "decode"):
        out[k + "_runs"] = [x for r in ok for x in r[k + "_runs"]]
        out[k + "_tps"] = statistics.median(out[k + "_runs"])
    out["gb_per_s"] = out["weight_bytes"] * out["decode_tps"] / 1e9
    out["bw_shares"] = [x for r in ok for x in r.get("bw_shares", [])]
    out["peak_rss"] = None if any(r["peak_rss"] is None for r in ok) else max(r["peak_rss"] for r in ok)
    return out


def _row_line(r: dict) -> str:
    if "error" in r:
        return f"  {r['row']}: failed (exit {r['error']})"
    return (f"  {r['row']}: prefill {r['prefill_tps']:.2f} tok/s, decode {r['decode_tps']:.2f} tok/s, "
            f"{r['gb_per_s']:.2f} GB/s, peak RSS {(r['peak_rss'] or 0) / 1e9:.2f} GB")


def merge(speeds: list[dict]) -> dict:
    """Results of split runs as one: rows in order of first appearance (a later run of a row replaces
    an earlier one), the best bandwidth seen, the settings of the first run."""
    rows: dict[str, dict] = {}
    for s in speeds:
        for r in s["rows"]:
            rows[r["row"]] = r
    bw = {k: max(s["bandwidth_gbs"][k] for s in speeds) for k in speeds[0]["bandwidth_gbs"]}
    return {**speeds[0], "rows": list(rows.values()), "bandwidth_gbs": bw, "merged_runs": len(speeds),
            "seconds": sum(s["seconds"] for s in speeds), "commits": sorted({s["commit"] for s in speeds})}


def table(speed: dict) -> str:
    """The one table: every row, its GB/s against the measured bandwidth, ratios against its matches."""
    bw = speed["bandwidth_gbs"]["read"]
    by = {r["row"]: r for r in speed["rows"] if "error" not in r}

    def ratio(row, i, key):
        other = by.get(MATCH.get(row, (None, None))[i])
        return f"{by[row][key] / other[key]:.2f}x" if other else ""

    head = ["row", "GB/token", "prefill tok/s", "decode tok/s", "GB/s", "% of bw", "% of bw around", "decode vs llama.cpp",
            "prefill vs llama.cpp", "decode vs hf", "prefill vs hf", "peak RSS GB"]
    lines, few = [], []
    for r in speed["rows"]:
        if "error" in r:
            lines.append([r["row"], "failed"] + [""] * (len(head) - 2))
            continue
        name = r["row"] + (f" ({MATCH[r['row']][0]})" if r["row"] in MATCH and MATCH[r["row"]][0] in by else "")
        lines.append([name, f"{r['weight_bytes'] / 1e9:.3f}", f"{r['prefill_tps']:.2f}", f"{r['decode_tps']:.2f}",
                      f"{r['gb_per_s']:.2f}", f"{100 * r['gb_per_s'] / bw:.0f}%",
                      f"{100 * statistics.median(r['bw_shares']):.0f}%" if r.get("bw_shares") else "",
                      ratio(r["row"], 0, "decode_tps"), ratio(r["row"], 0, "prefill_tps"),
                      ratio(r["row"], 1, "decode_tps"), ratio(r["row"], 1, "prefill_tps"),
                      "" if r["peak_rss"] is None else f"{r['peak_rss'] / 1e9:.2f}"])
        few += [f"{r['row']} {k}: {len(r[k + '_runs'])} run(s)" for k in ("prefill", "decode")
                if len(r[k + "_runs"]) < speed["repeats"]]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cs: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cs, widths)))  # noqa: E731
    title = (f"{speed['shape']} shape ({speed['layers']} layers, random weights), batch 1, {speed['threads']} threads: "
             f"prefill {speed['prompt_len']} tokens; decode {speed['decode_tokens']} steps after a "
             f"{speed['context']}-token prompt; median of {speed['repeats']}; read bandwidth {bw:.1f} GB/s")
    foot = [f"(fewer runs, the cell budget ran out: {'; '.join(few)})"] if few else []
    foot.append(f"({speed['seconds']:.0f} s; {speed['cpu']}; commit {', '.join(speed.get('commits', [speed['commit']]))})")
    return "\n".join([title, fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines] + foot)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"speed rows, any of {','.join(ROWS)} (default: %(default)s)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 30, the 1.2B; --tiny: 2)")
    p.add_argument("--tiny", action="store_true", help="a tiny shape (hidden 256, vocab 4096) instead of the 1.2B, for tests")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill length (default: %(default)s)")
    p.add_argument("--context", type=int, default=32, help="prompt length before the timed decode (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=16, help="timed decode steps per run (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs per cell, median reported (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every row's process this many times, rows taking turns; the median pools all "
                        "rounds' runs (default: %(default)s)")
    p.add_argument("--cell-budget", type=float, default=60.0,
                   help="no new run of a cell after this many seconds in it (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-engine", action="store_true", help="our decode through model + cache, not exaone.engine")
    p.add_argument("--model", help="checkpoint for the quality part (default: a random tiny model)")
    p.add_argument("--text", help="with --model: measure on this text file (default: 256 tokens sampled from the float model)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="print one table from the speed parts of these --json files")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_gguf", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    if args.repeats < 1 or args.rounds < 1 or args.decode_tokens < 1 or args.prompt_len < 16 or args.context < 4:
        p.error("need --repeats >= 1, --rounds >= 1, --decode-tokens >= 1, --prompt-len >= 16, --context >= 4")
    if args._child:
        print(json.dumps(_gguf_child(args) if args._child == "gguf" else _speed_child(args)))
        return 0
    if args.merge:
        speeds = []
        for path in args.merge:
            with open(path) as f:
                speeds.append(json.load(f)["speed"])
        out = {"speed": merge(speeds)}
        print(table(out["speed"]))
    else:
        torch.set_num_threads(args.threads)
        out = {"torch": torch.__version__, "threads": args.threads}
        if not args.skip_quality:
            out["quality"] = _quality(args)
            print(f"quality ({args.model or 'random tiny model, Student-t weights, hidden 256'}):")
            for r in out["quality"]:
                print(f"  {r['variant']:<32} rel err {r['rel_err']:6.4f}  top-1 {r['top1']:5.3f}  "
                      f"KL {r['kl']:7.5f}  ppl {r['ppl']:8.3f}")
        if not args.skip_speed:
            out["speed"] = _speed(args)
            print(table(out["speed"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        if os.path.exists(args.json + ".partial"):
            os.remove(args.json + ".partial")
    return 0


if __name__ == "__main__":
    sys.exit(main())
