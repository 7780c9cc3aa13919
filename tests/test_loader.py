"""exaone.load / exaone.save: round trips, sharding, dtypes, meta-device construction, and
errors that name the file and the tensor."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import exaone
from exaone import loader
from exaone.config import ConfigError
from exaone.loader import CheckpointError
from exaone.testing import make_random_checkpoint, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")

IDS = torch.arange(3, 3 + 40).remainder(500)[None]  # 40 tokens > window 16


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_weights(path, fn):
    f = path / "model.safetensors"
    state = load_file(str(f))
    fn(state)
    save_file(state, str(f), metadata={"format": "pt"})
    return f


@torch.no_grad()
def _logits(model):
    return model(IDS)


# ---- round trips -------------------------------------------------------------------------
def test_save_load_roundtrip_identical(tiny_checkpoint, tmp_path):
    m = exaone.load(tiny_checkpoint)
    out = exaone.save(m, tmp_path / "again")
    m2 = exaone.load(out)
    assert torch.equal(_logits(m), _logits(m2))
    for (n, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    assert m2.config.layer_types == m.config.layer_types


def test_sharded_save_roundtrips(tiny_checkpoint, tmp_path):
    m = exaone.load(tiny_checkpoint)
    out = exaone.save(m, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    index = json.loads((out / loader.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / loader.SINGLE).exists()
    assert set(index["weight_map"]) == set(m.state_dict())
    assert torch.equal(_logits(m), _logits(exaone.load(out)))


def test_tied_checkpoint_has_no_lm_head_and_loads(tiny_checkpoint_tied):
    with safe_open(str(tiny_checkpoint_tied / loader.SINGLE), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    m = exaone.load(tiny_checkpoint_tied)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    # Untied in the file would mean the head ignores the embedding; check the logits use it.
    h = m.model.norm(torch.ones(1, 1, m.config.hidden_size))
    torch.testing.assert_close(m.lm_head(h), h @ m.model.embed_tokens.weight.T)


def test_bf16_load_gives_bf16_parameters(tiny_checkpoint):
    m = exaone.load(tiny_checkpoint, dtype="bfloat16")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.inv_freq.dtype == torch.float32  # RoPE frequencies stay exact
    assert m(IDS).dtype == torch.bfloat16
    m32 = exaone.load(tiny_checkpoint, dtype=torch.float32)
    torch.testing.assert_close(m(IDS).float(), m32(IDS), atol=0.05, rtol=0)


def test_stored_dtype_is_kept_by_default(tmp_path):
    p = make_random_checkpoint(tmp_path / "bf16", tiny_config(), dtype=torch.bfloat16, tokenizer=False)
    assert json.loads((p / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert exaone.load(p).dtype == torch.bfloat16


def test_model_is_built_on_meta_and_nothing_left_there(tiny_checkpoint, monkeypatch):
    built_on = []

    class Spy(loader.Exaone4ForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            built_on.append(self.model.embed_tokens.weight.device.type)

    monkeypatch.setattr(loader, "Exaone4ForCausalLM", Spy)
    m = exaone.load(tiny_checkpoint)
    assert built_on == ["meta"]
    left = [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta]
    assert not left, left
    assert not any(p.requires_grad for p in m.parameters()) and not m.training


def test_random_checkpoint_is_deterministic_and_exercises_norms(tmp_path):
    a = make_random_checkpoint(tmp_path / "a", tiny_config(), seed=3, tokenizer=False)
    b = make_random_checkpoint(tmp_path / "b", tiny_config(), seed=3, tokenizer=False)
    sa, sb = load_file(str(a / loader.SINGLE)), load_file(str(b / loader.SINGLE))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    norm = sa["model.layers.0.self_attn.q_norm.weight"]
    assert 0.5 < norm.mean() < 1.5 and norm.std() > 0.01
    assert abs(sa["model.embed_tokens.weight"].std() - 0.02) < 0.002


def test_random_checkpoint_with_tokenizer(tmp_path):
    pytest.importorskip("exaone.tokenizer_build")
    p = make_random_checkpoint(tmp_path / "t", tiny_config(), tokenizer=True)
    assert (p / "tokenizer.json").is_file()
    vocab = json.loads((p / "tokenizer.json").read_text())
    n = len(vocab["model"]["vocab"]) + len([t for t in vocab["added_tokens"] if t["content"] not in vocab["model"]["vocab"]])
    m = exaone.load(p)
    assert m.config.vocab_size == n
    assert m(torch.tensor([[n - 1, 0, 1]])).shape == (1, 3, n)  # every id fits


# ---- errors: each names the file and/or the tensor -----------------------------------------
def test_missing_tensor(tiny_checkpoint, tmp_path):
    p = _copy(tiny_checkpoint, tmp_path)
    _edit_weights(p, lambda s: s.pop("model.layers.2.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.2\.self_attn\.k_norm\.weight") as e:
        exaone.load(p)
    assert str(p) in str(e.value)


def test_extra_tensor(tiny_checkpoint, tmp_path):
    p = _copy(tiny_checkpoint, tmp_path)
    _edit_weights(p, lambda s: s.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.9\.mlp\.up_proj\.weight"):
        exaone.load(p)


def test_ignored_rotary_buffer_is_not_an_error(tiny_checkpoint, tmp_path):
    p = _copy(tiny_checkpoint, tmp_path)
    _edit_weights(p, lambda s: s.update({"model.rotary_emb.inv_freq": torch.ones(8)}))
    exaone.load(p)


def test_wrong_shape(tiny_checkpoint, tmp_path):
    p = _copy(tiny_checkpoint, tmp_path)
    f = _edit_weights(p, lambda s: s.update({"model.layers.1.mlp.down_proj.weight": torch.zeros(64, 100)}))
    with pytest.raises(CheckpointError) as e:
        exaone.load(p)
    msg = str(e.value)
    assert str(f) in msg and "model.layers.1.mlp.down_proj.weight" in msg and "[64, 100]" in msg and "[64, 128]" in msg


def test_truncated_file(tiny_checkpoint, tmp_path):
    p = _copy(tiny_checkpoint, tmp_path)
    f = p / loader.SINGLE
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors") as e:
        exaone.load(p)
    assert str(f) in str(e.value)


def test_corrupt_header(tiny_checkpoint, tmp_path):
    p = _copy(tiny_checkpoint, tmp_path)
    f = p / loader.SINGLE
    data = bytearray(f.read_bytes())
    data[8:200] = b"\xde\xad\xbe\xef" * 48  # the JSON header starts at byte 8
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="cannot read safetensors") as e:
        exaone.load(p)
    assert str(f) in str(e.value)
    f.write_bytes(b"garbage, not a safetensors file at all")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        exaone.load(p)


def test_missing_config(tiny_checkpoint, tmp_path):
    p = _copy(tiny_checkpoint, tmp_path)
    (p / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        exaone.load(p)


def test_invalid_config(tiny_checkpoint, tmp_path):
    p = _copy(tiny_checkpoint, tmp_path)
    (p / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        exaone.load(p)


def test_config_that_does_not_match_weights(tiny_checkpoint, tmp_path):
    p = _copy(tiny_checkpoint, tmp_path)
    d = json.loads((p / "config.json").read_text())
    d["num_hidden_layers"] = 3
    d.pop("layer_types")
    (p / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.3\."):
        exaone.load(p)


def test_missing_weights_file(tiny_checkpoint, tmp_path):
    p = _copy(tiny_checkpoint, tmp_path)
    (p / loader.SINGLE).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors") as e:
        exaone.load(p)
    assert str(p) in str(e.value)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        exaone.load(tmp_path / "nowhere")


def test_sharded_with_missing_shard(tiny_checkpoint, tmp_path):
    out = exaone.save(exaone.load(tiny_checkpoint), tmp_path / "sharded", max_shard_bytes=64 * 1024)
    shards = sorted(set(json.loads((out / loader.INDEX).read_text())["weight_map"].values()))
    (out / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=shards[1]):
        exaone.load(out)


def test_sharded_with_corrupt_index(tiny_checkpoint, tmp_path):
    out = exaone.save(exaone.load(tiny_checkpoint), tmp_path / "sharded", max_shard_bytes=64 * 1024)
    (out / loader.INDEX).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=loader.INDEX):
        exaone.load(out)


def test_bad_dtype_lists_the_choices(tiny_checkpoint):
    with pytest.raises(ValueError, match="bfloat16"):
        exaone.load(tiny_checkpoint, dtype="float8")
