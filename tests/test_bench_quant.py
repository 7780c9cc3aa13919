"""bench/bench_quant.py's speed table on a tiny shape: our int8 row against llama.cpp F16 / Q8_0 /
Q4_K_M (our GGUF export, then llama.cpp's own quantizer), each row in its own process; split runs
merge into the same table; --rounds pools each row's processes. Timings here mean nothing (tiny
model, busy machine): the test checks that the rows run, what they read and how the table is put
together.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="the GGUF export needs `pip install 'exaone[gguf]'`")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (CMAKE_ARGS='-DGGML_AMX=OFF "
                                        "-DGGML_NATIVE=OFF' pip install llama-cpp-python)")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_quant.py"
ROWS = ["int8", "int8-torch", "llama-F16", "llama-Q8_0", "llama-Q4_K_M"]
ROUNDS = 2  # each row's process twice, rows taking turns, one run each: the pooled median of 2


def _bench(*args, tmp):
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_quant")
    out = _bench("--tiny", "--skip-quality", "--rows", ",".join(ROWS), "--threads", "1", "--repeats", "1",
                 "--rounds", str(ROUNDS),
                 "--prompt-len", "32", "--decode-tokens", "4", "--json", str(tmp / "out.json"), tmp=tmp)
    return tmp, out, json.loads((tmp / "out.json").read_text())["speed"]


def test_llama_cpp_rows_run_on_our_export(run):
    tmp, _, speed = run
    rows = {r["row"]: r for r in speed["rows"]}
    assert list(rows) == ROWS and not any("error" in r for r in rows.values())
    for r in rows.values():
        assert len(r["decode_runs"]) == len(r["prefill_runs"]) == ROUNDS
        assert r["decode_tps"] == pytest.approx(sum(r["decode_runs"]) / ROUNDS) and r["prefill_tps"] > 0
        assert r["gb_per_s"] == pytest.approx(r["weight_bytes"] * r["decode_tps"] / 1e9)
        # each child's own peak, not the parent's, nor its bandwidth probes' (2 GiB each)
        assert r["peak_rss"] < 1.5e9
        # a share of the bandwidth measured around each decode run
        assert len(r["bw_shares"]) == ROUNDS and all(x > 0 for x in r["bw_shares"])
    f16, q8, q4 = rows["llama-F16"], rows["llama-Q8_0"], rows["llama-Q4_K_M"]
    assert set(f16["tensor_types"]) == {"F16", "F32"}  # matrices F16, norms F32
    assert set(q8["tensor_types"]) == {"Q8_0", "F32"}
    assert "Q4_K" in q4["tensor_types"] and "F16" not in q4["tensor_types"]
    # tied embedding, no output.weight: the embedding is the output matrix and counted
    assert f16["weight_bytes"] > 0.95 * f16["file_bytes"]
    # format sizes: Q8_0 is 34 bytes per 32 weights (vs 64 in F16); Q4_K is 4.5 bits, Q6_K 6.56
    assert q8["weight_bytes"] / f16["weight_bytes"] == pytest.approx(34 / 64, rel=0.03)
    assert 4.5 / 16 < q4["weight_bytes"] / f16["weight_bytes"] < 6.6 / 16
    # our int8 has an int8 lm_head and one scale per row (Q8_0: one per 32 weights): fewer bytes than Q8_0;
    # int8-torch keeps the tied lm_head in bfloat16: more bytes than Q8_0, fewer than F16
    assert rows["int8"]["weight_bytes"] < q8["weight_bytes"] < rows["int8-torch"]["weight_bytes"] < f16["weight_bytes"]
    assert not list(tmp.glob("bench_quant_gguf_*")), "the GGUF temp dir was not removed"


def test_table_has_ratios_against_the_matching_llama_cpp_row(run):
    _, out, speed = run
    rows = {r["row"]: r for r in speed["rows"]}
    line = next(l for l in out.splitlines() if l.startswith("int8 (llama-Q8_0)"))
    assert f"{rows['int8']['decode_tps'] / rows['llama-Q8_0']['decode_tps']:.2f}x" in line
    assert f"{rows['int8']['prefill_tps'] / rows['llama-Q8_0']['prefill_tps']:.2f}x" in line
    bw = speed["bandwidth_gbs"]["read"]
    assert f"{100 * rows['int8']['gb_per_s'] / bw:.0f}%" in line
    assert f"{100 * statistics.median(rows['int8']['bw_shares']):.0f}%" in line
    assert "% of bw around" in out


def test_split_runs_merge_into_the_same_table(run):
    tmp, out, speed = run
    parts = []
    for i, rows in enumerate((speed["rows"][:3], speed["rows"][3:])):
        parts.append(tmp / f"part{i}.json")
        parts[-1].write_text(json.dumps({"speed": {**speed, "rows": rows}}))
    merged = _bench("--merge", *map(str, parts), "--json", str(tmp / "merged.json"), tmp=tmp)
    body = lambda text: [l for l in text.splitlines() if not l.startswith("(")]  # noqa: E731 footers differ
    assert body(merged) == body(out)
    assert json.loads((tmp / "merged.json").read_text())["speed"]["merged_runs"] == 2


def test_unknown_row_is_refused(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH), "--rows", "int8,llama-Q5"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown rows ['llama-Q5']" in r.stderr
