"""A first generate path: one sequence, KV cache, greedy or temperature sampling.

`generate_reference` is the slow path (no cache, the whole sequence every step) that tests hold
the cached paths to. The batched engine lives in engine.py; this stays small on purpose.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .model import Exaone4ForCausalLM


def _pick(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.inference_mode()
def generate_stream(model: Exaone4ForCausalLM, prompt_ids: Sequence[int], max_tokens: int = 64,
                    temperature: float = 0.0, seed: int | None = None,
                    stop_ids: Sequence[int] = (), chunk: int = 512) -> Iterator[int]:
    """Yield generated token ids one by one (stops after a stop id, which is yielded)."""
    if not prompt_ids:
        raise ValueError("prompt is empty")
    total = len(prompt_ids) + max_tokens
    if len(prompt_ids) >= model.config.max_position_embeddings:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's context is "
                         f"{model.config.max_position_embeddings}")
    total = min(total, model.config.max_position_embeddings)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = model.make_cache(rows=1, max_len=total)
    ids = torch.tensor([list(prompt_ids)], device=model.device)
    logits = None
    for s in range(0, ids.shape[1], chunk):  # chunked prefill: exact with the ring caches
        part = ids[:, s:s + chunk]
        pos = torch.arange(s, s + part.shape[1], device=model.device)[None]
        logits = model(part, position_ids=pos, cache=cache, last_only=True)
    n = ids.shape[1]
    for _ in range(total - n):
        tok = _pick(logits[0, -1], temperature, gen)
        yield tok
        if tok in stop_ids:
            return
        logits = model(torch.tensor([[tok]], device=model.device),
                       position_ids=torch.tensor([[n]], device=model.device), cache=cache)
        n += 1


def generate(model, prompt_ids, **kw) -> list[int]:
    return list(generate_stream(model, prompt_ids, **kw))


@torch.inference_mode()
def generate_reference(model: Exaone4ForCausalLM, prompt_ids: Sequence[int], max_tokens: int = 64,
                       stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy decoding with no cache: the slow, obviously-correct reference."""
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids], device=model.device))
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        ids.append(tok)
        if tok in stop_ids:
            break
    return out
