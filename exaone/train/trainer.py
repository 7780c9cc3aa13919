"""The training loop for the demo model: hybrid SFT on synthetic tasks, rendered in both modes.

One process, or several under `torchrun` (DDP; data sharded by rank; only rank 0 writes). AdamW,
linear warmup then cosine decay, gradient clipping, length-bucketed batches (right padding, so a
causal model needs no attention mask and pads never touch a real token), a periodic held-out
evaluation, and checkpoints in the Hugging Face format through `exaone.save` with the optimizer
and step in `trainer_state.pt` beside them, so a run resumes where it stopped.

This module owns the loop; it must not know the tasks' text (data.py) or how a report looks.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from ..config import Exaone4Config
from ..model import Exaone4ForCausalLM
from . import data

STATE_FILE = "trainer_state.pt"
CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainConfig:
    out: str
    steps: int = 3000
    batch_size: int = 32          # sequences per step and process
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 500
    eval_per_task: int = 8
    save_every: int = 250
    log_every: int = 25
    time_budget_s: float | None = None  # stop (and finish the schedule) when this much time is spent
    device: str | None = None     # None: cuda when present, else cpu
    resume: bool = False
    tokenizer: str | None = None  # an existing tokenizer folder; None: build one from the task corpus
    vocab_size: int = 2048
    pool_batches: int = 16        # batches drawn at once, sorted by length, then shuffled
    max_len: int = 256
    threads: int | None = None
    embed_std: float = 0.05
    post_norm_init: float = 0.1   # initial gain of the post-attention / post-feedforward norms
    model: dict = field(default_factory=dict)  # Exaone4Config overrides


# The shipped shape: 8 layers, 3 local : 1 global, a small window; a few million parameters.
NANO = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, head_dim=48, sliding_window=128, sliding_window_pattern="LLLG",
            max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True,
            rms_norm_eps=1e-5)


def model_config(vocab_size: int, tokenizer=None, **overrides) -> Exaone4Config:
    kw = {**NANO, **overrides, "vocab_size": vocab_size}
    if tokenizer is not None:
        ids = tokenizer.convert_tokens_to_ids(["[BOS]", "[|endofturn|]", "[PAD]"])
        kw.update(bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[2])
    return Exaone4Config(**kw)


# ---- distributed -------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# ---- batches ------------------------------------------------------------------------------
def rendered_stream(tokenizer, seed: int, rank: int = 0, world: int = 1,
                    max_len: int = 256) -> Iterator[tuple[list[int], list[int]]]:
    """Each training problem in both modes (thinking, then not), sharded by rank."""
    for ex in itertools.islice(data.training_examples(seed), rank, None, world):
        for thinking in (True, False):
            ids, labels = data.render(ex, tokenizer, thinking)
            if len(ids) <= max_len:
                yield ids, labels


def batches(stream: Iterator, batch_size: int, pad_id: int, pool_batches: int, seed: int) -> Iterator[dict]:
    """Length-bucketed, right-padded batches: a pool of sequences is sorted by length and cut into
    batches (little padding), and the batches are shuffled (no length curriculum)."""
    rng = random.Random(seed)
    while True:
        pool = list(itertools.islice(stream, batch_size * pool_batches))
        if not pool:
            return
        pool.sort(key=lambda s: len(s[0]))
        group = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(group)
        for seqs in group:
            T = max(len(s[0]) for s in seqs)
            ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
            labels = torch.full((len(seqs), T), data.IGNORE, dtype=torch.long)
            for i, (x, y) in enumerate(seqs):
                ids[i, :len(x)] = torch.tensor(x)
                labels[i, :len(y)] = torch.tensor(y)
            yield {"input_ids": ids, "labels": labels}


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy over the labelled (assistant) tokens."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1), ignore_index=data.IGNORE)


def lr_at(step: int, cfg: TrainConfig, time_frac: float = 0.0) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio over the steps, or over the time budget
    when that runs out first (time_frac = share of the budget spent), so a slow machine still
    finishes its schedule."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, max(time_frac, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Matrices decay; norms' gains do not (decaying a gain toward 0 only fights the norm).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


# ---- evaluation ---------------------------------------------------------------------------
@torch.no_grad()
def quick_eval(model: Exaone4ForCausalLM, tokenizer, per_task: int = 8,
               tasks=("add", "mul", "count"), seed: int = 99) -> dict[str, float]:
    """Held-out accuracy of greedy decoding, per task and mode, on a small fixed sample."""
    from ..generate import generate

    was_training = model.training
    model.eval()
    stop = [tokenizer.convert_tokens_to_ids("[|endofturn|]")]
    out = {}
    for task in tasks:
        exs = data.heldout_examples(task, per_task, seed=seed)
        for thinking in (True, False):
            ok = 0
            for ex in exs:
                ids = generate(model, data.prompt_ids(ex, tokenizer, thinking),
                               max_tokens=200 if thinking else 32, stop_ids=stop)
                ok += data.score(ex, tokenizer.decode(ids))
            out[f"{task}/{'think' if thinking else 'direct'}"] = ok / len(exs)
    model.train(was_training)
    return out


# ---- checkpoints --------------------------------------------------------------------------
def save_checkpoint(model, optimizer, tokenizer, step: int, cfg: TrainConfig, path: Path,
                    extra: dict | None = None) -> None:
    from ..loader import save

    tmp = path.with_name(path.name + ".tmp")
    save(model, tmp, tokenizer=tokenizer)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": asdict(cfg),
                "torch_rng": torch.get_rng_state(), **(extra or {})}, tmp / STATE_FILE)
    if path.exists():
        import shutil
        shutil.rmtree(path)
    tmp.rename(path)  # a crash mid-save leaves the previous checkpoint whole


def load_checkpoint(path: Path, model, optimizer) -> tuple[int, float]:
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    model.load_state_dict(state, strict=not model.config.tie_word_embeddings)
    model.tie_weights()
    st = torch.load(path / STATE_FILE, weights_only=False)
    optimizer.load_state_dict(st["optimizer"])
    torch.set_rng_state(st["torch_rng"])
    return int(st["step"]), float(st.get("elapsed_s", 0.0))


def get_tokenizer(cfg: TrainConfig, out: Path, main: bool):
    from ..tokenizer import load_tokenizer
    from ..tokenizer_build import build_tokenizer

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    tok_dir = out / "tokenizer"
    if cfg.resume and (tok_dir / "tokenizer.json").is_file():  # written whole by the first run
        return load_tokenizer(tok_dir)
    # Deterministic for a fixed corpus, so every rank builds the same one; rank 0 also writes it.
    return build_tokenizer(data.corpus_texts(), vocab_size=cfg.vocab_size, individual_digits=True,
                           out_dir=tok_dir if main else None)


# ---- the loop -----------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(msg, flush=True)


def train(cfg: TrainConfig, progress: bool = True, log=_log) -> dict:
    """Train; returns {'step', 'loss', 'wall_s', 'tokens', 'eval', 'history'}. Writes the final model to cfg.out."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device_type = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dist = init_distributed(device_type)
    device = torch.device(f"cuda:{dist.local_rank}" if device_type == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(cfg.out)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tokenizer = get_tokenizer(cfg, out, dist.main)
    config = model_config(len(tokenizer), tokenizer, **cfg.model)
    model = Exaone4ForCausalLM(config).to(device)
    init_weights(model, cfg.seed, cfg.embed_std, cfg.post_norm_init)
    optimizer = make_optimizer(model, cfg)
    start, prior_s = 0, 0.0
    ckpt = out / CHECKPOINT_DIR
    if cfg.resume and (ckpt / STATE_FILE).is_file():
        start, prior_s = load_checkpoint(ckpt, model, optimizer)
        log(f"resumed from {ckpt} at step {start}")
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ddp = model
    if dist.main:
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        log(f"model: {config.num_parameters() / 1e6:.2f}M parameters, layers {''.join('L' if s else 'G' for s in config.is_sliding)}, "
            f"vocab {config.vocab_size}; device {device}, world {dist.world}, threads {torch.get_num_threads()}")

    # A resumed run draws fresh problems from a seed tied to the step: deterministic, never a replay.
    stream_seed = cfg.seed * 1_000_003 + start
    stream = rendered_stream(tokenizer, stream_seed, dist.rank, dist.world, cfg.max_len)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    it = batches(stream, cfg.batch_size, pad_id, cfg.pool_batches, stream_seed + dist.rank)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    bar = _progress(progress and dist.main)
    task = bar.add_task("train", total=cfg.steps, completed=start, info="") if bar else None
    t0 = time.time()
    tokens = 0
    loss_ema = None
    history: list[dict] = []
    evals: dict = {}
    model.train()
    try:
        if bar:
            bar.start()
        step, time_frac = start, 0.0
        while step < cfg.steps and time_frac < 1.0:
            batch = next(it)
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            lr = lr_at(step, cfg, time_frac)
            for g in optimizer.param_groups:
                g["lr"] = lr
            with autocast:
                loss = loss_fn(ddp(ids), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            tokens += ids.numel() * dist.world
            lv = loss.item()
            loss_ema = lv if loss_ema is None else 0.95 * loss_ema + 0.05 * lv
            elapsed = time.time() - t0
            if cfg.time_budget_s:
                time_frac = _agree_max((prior_s + elapsed) / cfg.time_budget_s, dist, device)
            step += 1
            last = step == cfg.steps or time_frac >= 1.0
            if dist.main:
                if bar:
                    bar.update(task, completed=step,
                               info=f"loss {loss_ema:.3f}  lr {lr:.2e}  {tokens / elapsed:,.0f} tok/s")
                if step % cfg.log_every == 0 or last:
                    history.append({"step": step, "loss": round(loss_ema, 4), "loss_step": round(lv, 4), "lr": lr,
                                    "grad_norm": round(float(gnorm), 3), "tokens": tokens,
                                    "elapsed_s": round(elapsed, 1)})
                    with open(out / "log.jsonl", "a") as f:
                        f.write(json.dumps(history[-1]) + "\n")
                    if not bar:
                        log(json.dumps(history[-1]))
                if cfg.eval_every and (step % cfg.eval_every == 0 or last):
                    evals = quick_eval(model, tokenizer, cfg.eval_per_task)
                    msg = {"step": step, "eval": evals}
                    with open(out / "log.jsonl", "a") as f:
                        f.write(json.dumps(msg) + "\n")
                    (bar.console.print if bar else log)(json.dumps(msg))
                if cfg.save_every and step % cfg.save_every == 0 and not last:
                    save_checkpoint(model, optimizer, tokenizer, step, cfg, ckpt,
                                    {"elapsed_s": prior_s + time.time() - t0})
    finally:
        if bar:
            bar.stop()
    wall = time.time() - t0
    if dist.main:
        save_checkpoint(model, optimizer, tokenizer, step, cfg, ckpt, {"elapsed_s": prior_s + wall})
        from ..loader import save
        save(model, out, tokenizer=tokenizer)
    if dist.world > 1:
        import torch.distributed as tdist
        tdist.barrier()
        tdist.destroy_process_group()
    return {"step": step, "loss": loss_ema, "wall_s": wall, "tokens": tokens, "eval": evals,
            "history": history}


def _agree_max(x: float, dist: Dist, device) -> float:
    """Every rank takes the largest value, so all ranks stop on the same step."""
    if dist.world == 1:
        return x
    import torch.distributed as tdist

    t = torch.tensor([x], dtype=torch.float64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t)


def init_weights(model: Exaone4ForCausalLM, seed: int, embed_std: float = 0.02, post_norm_init: float = 1.0) -> None:
    """Normal(0, 0.02) matrices, Normal(0, embed_std) embeddings; post-sublayer norm gains at post_norm_init.

    With no pre-norm, each block adds a unit-RMS (times gain) output to the residual; a small gain
    keeps the token embedding from being drowned by the first blocks' outputs early in training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = embed_std if name == "model.embed_tokens.weight" else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                p.fill_(post_norm_init)


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
