"""exaone.hugepages: weights in 2 MB-aligned, MADV_HUGEPAGE-advised memory where the OS offers it;
torch's allocator otherwise. Checked against the kernel's own record (/proc/self/smaps)."""
from __future__ import annotations

import gc

import pytest
import torch

import exaone
from exaone import hugepages
from exaone.quant import load_quantized, quantize_model, save_quantized
from exaone.testing import make_random_checkpoint, tiny_config

BIG = (1024, 1024)  # 4 MB of float32: two huge pages


def _mapped(addr: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(v, 16) for v in line.split(None, 1)[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


def test_mode_follows_the_system_setting(monkeypatch):
    monkeypatch.delenv("EXAONE_HUGEPAGES", raising=False)
    mode = hugepages._thp_mode()
    assert hugepages.enabled() == (mode in ("always", "madvise"))
    monkeypatch.setenv("EXAONE_HUGEPAGES", "0")
    assert not hugepages.enabled()


@pytest.mark.skipif(not hugepages.enabled(), reason="this system offers no transparent huge pages")
def test_big_tensor_is_aligned_advised_and_freed():
    t = hugepages.empty(BIG, torch.float32)
    assert t.shape == BIG and t.dtype is torch.float32 and t.is_contiguous()
    assert t.data_ptr() % hugepages.HUGE == 0 and hugepages.in_huge_pages(t)
    assert t.untyped_storage().nbytes() == t.numel() * 4  # no slack in the storage (copies, safetensors)
    t.copy_(torch.arange(t.numel(), dtype=torch.float32).view(BIG))
    assert t[1023, 1023].item() == t.numel() - 1
    addr = t.data_ptr()
    del t
    gc.collect()
    assert not _mapped(addr)  # the mapping goes with the tensor


def test_small_tensors_and_the_switch_use_torch(monkeypatch):
    small = hugepages.empty((100, 100), torch.float32)  # 40 KB: not worth a 2 MB page
    assert not hugepages.in_huge_pages(small)
    monkeypatch.setenv("EXAONE_HUGEPAGES", "0")
    t = hugepages.empty(BIG, torch.bfloat16)
    assert t.shape == BIG and t.dtype is torch.bfloat16 and not hugepages.in_huge_pages(t)
    src = torch.randn(BIG)
    assert hugepages.copy(src) is src  # nothing to change: no copy


def test_copy_keeps_values_and_converts():
    src = torch.randn(BIG)
    for dtype in (torch.float32, torch.bfloat16):
        out = hugepages.copy(src, dtype)
        assert out.dtype is dtype and torch.equal(out, src.to(dtype))
        assert hugepages.in_huge_pages(out) == hugepages.enabled()
    strided = torch.randn(1024, 2048)[:, :1024]
    out = hugepages.copy(strided)
    assert torch.equal(out, strided) and out.is_contiguous() == hugepages.enabled()


@pytest.mark.skipif(not hugepages.enabled(), reason="this system offers no transparent huge pages")
def test_loaded_and_quantized_weights_live_in_huge_pages(tmp_path):
    # a vocabulary large enough that the tables span huge pages: 8192 x 256 bfloat16 = 4 MB
    config = tiny_config(vocab_size=8192, hidden_size=256, intermediate_size=512, head_dim=64)
    path = make_random_checkpoint(tmp_path / "ckpt", config, tokenizer=False)
    as_stored = exaone.load(path)  # float32 as stored: read from the file into 2 MB pages
    assert hugepages.in_huge_pages(as_stored.model.embed_tokens.weight)
    assert not hugepages.in_huge_pages(as_stored.model.norm.weight)  # 1 KB: a view of the file
    model = exaone.load(path, dtype="bfloat16")  # converted: the new tensors go to 2 MB pages
    assert hugepages.in_huge_pages(model.model.embed_tokens.weight)
    assert hugepages.in_huge_pages(model.lm_head.weight)
    assert not hugepages.in_huge_pages(model.model.norm.weight)  # 512 bytes
    assert torch.equal(model.lm_head.weight, as_stored.lm_head.weight.bfloat16())
    ids = torch.arange(1, 40)[None]
    with torch.inference_mode():
        ref = model(ids)
    quantize_model(model, "int8", lm_head="int8")  # lm_head: 8192 x 256 int8 = 2 MB packed
    assert hugepages.in_huge_pages(model.lm_head.qweight)
    out = save_quantized(model, tmp_path / "q")  # safetensors writes a tensor that is a view of a mapping
    again = load_quantized(out)
    assert hugepages.in_huge_pages(again.lm_head.qweight)
    with torch.inference_mode():
        a, b = model(ids), again(ids)
    assert torch.equal(a, b)
    assert (a - ref).norm() / ref.norm() < 0.05


def test_quantizer_hands_freed_memory_back_after_each_linear(monkeypatch):
    from exaone.model import Exaone4ForCausalLM

    calls = []
    monkeypatch.setattr(hugepages, "trim", lambda: calls.append(1))
    config = tiny_config(hidden_size=128, intermediate_size=256, head_dim=32)
    model = quantize_model(Exaone4ForCausalLM(config), "int8", lm_head="int8")
    assert len(calls) == 7 * config.num_hidden_layers + 1  # every decoder linear and lm_head
    monkeypatch.undo()
    hugepages.trim()  # the real one: harmless at any time (a no-op without glibc)
    assert model.quantization_config["quant_method"] == "exaone-int8"


@pytest.mark.skipif(not hugepages.enabled(), reason="this system offers no transparent huge pages")
def test_loading_reads_the_files_bytes_exactly_and_off_switch_keeps_file_views(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    config = tiny_config(vocab_size=8192, hidden_size=256, intermediate_size=512, head_dim=64)
    path = make_random_checkpoint(tmp_path / "ckpt", config, tokenizer=False, dtype=torch.bfloat16)
    stored = load_file(str(path / "model.safetensors"))
    model = exaone.load(path)
    for name, t in model.state_dict().items():
        assert t.dtype is torch.bfloat16 and torch.equal(t, stored[name]), name
    monkeypatch.setenv("EXAONE_HUGEPAGES", "0")
    viewed = exaone.load(path)
    assert not hugepages.in_huge_pages(viewed.model.embed_tokens.weight)
    assert torch.equal(viewed.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.skipif(not hugepages.enabled(), reason="this system offers no transparent huge pages")
def test_a_file_cut_short_after_opening_names_the_file_and_tensor(tmp_path):
    from exaone.loader import CheckpointError, _open

    config = tiny_config(vocab_size=8192, hidden_size=256, intermediate_size=512, head_dim=64)
    path = make_random_checkpoint(tmp_path / "ckpt", config, tokenizer=False)
    file = path / "model.safetensors"
    with _open(file) as f:
        # the biggest tensor (read into 2 MB pages, not a view of the mapping), cut in its middle
        name = max(f.keys(), key=lambda n: f._info(n)["data_offsets"][1] - f._info(n)["data_offsets"][0])
        begin, end = f._info(name)["data_offsets"]
        with open(file, "r+b") as fh:
            fh.truncate(f._base + (begin + end) // 2)
        with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {name} is truncated"):
            f.tensor(name)


def test_loading_holds_the_weights_once(tmp_path):
    """Peak RSS of a fresh process that loads ~160 MB of weights and touches them all: reading them
    into 2 MB pages grows it as much as touching zero-copy views of the file does (weights once),
    not by the file's pages plus a copy of them (what copying from the file's mapping would cost)."""
    import json
    import os
    import subprocess
    import sys

    config = tiny_config(vocab_size=32768, hidden_size=512, intermediate_size=1024, head_dim=64)
    path = make_random_checkpoint(tmp_path / "ckpt", config, tokenizer=False)
    size = (path / "model.safetensors").stat().st_size
    code = (
        "import json, sys, torch, exaone, exaone.loader, exaone.model, safetensors.torch\n"
        "def hwm():\n"
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "before = hwm()\n"
        f"m = exaone.load({str(path)!r})\n"
        "total = sum(float(p.float().sum()) for p in m.parameters())\n"  # touch every weight
        "print(json.dumps({'grew': hwm() - before}))\n")

    def grew(hugepages_on: str) -> int:
        env = {**os.environ, "EXAONE_HUGEPAGES": hugepages_on}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])["grew"]

    read_in, views = grew("1"), grew("0")
    assert size > 60e6 and views > 0.9 * size  # the views' pages count once touched
    assert read_in < views + 0.5 * size, (read_in, views, size)
