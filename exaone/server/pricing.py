"""Per-model prices and the cost of one request, in exact decimals.

Prices are USD per million tokens for three kinds of token: prompt, cached prompt and
completion. Cached tokens are a part of `prompt_tokens` billed at the cached rate; reasoning
tokens are a part of `completion_tokens` billed at the completion rate. A model without its own
entry gets the default entry.

File format (JSON or TOML, chosen by the suffix; numbers are read as decimals, never floats):

    {"default": {"prompt": 0.20, "cached": 0.05, "completion": 0.80},
     "models": {"exaone-4.0-32b": {"prompt": 0.60, "cached": 0.15, "completion": 1.00}}}

    [default]
    prompt = 0.20
    cached = 0.05
    completion = 0.80
    [models."exaone-4.0-32b"]
    prompt = 0.60
    cached = 0.15
    completion = 1.00

This module knows nothing of databases or HTTP.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Mapping

# Prices carry at most this many decimal places (USD per million tokens), so the cost of a
# request is exact at PRICE_SCALE + 6 places; the ledger stores costs at that scale.
PRICE_SCALE = 6
COST_SCALE = PRICE_SCALE + 6
_PER = Decimal(1_000_000)


def to_decimal(value: Any, what: str) -> Decimal:
    """A non-negative Decimal from an int, str or Decimal (floats through their shortest repr)."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a number, got {value!r}")
    try:
        d = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except (InvalidOperation, TypeError):
        raise ValueError(f"{what}: expected a number, got {value!r}") from None
    if not d.is_finite() or d < 0:
        raise ValueError(f"{what}: must be a finite number >= 0, got {value!r}")
    return d


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""
    prompt: Decimal
    cached: Decimal
    completion: Decimal

    def __post_init__(self):
        for field in ("prompt", "cached", "completion"):
            d = to_decimal(getattr(self, field), f"price.{field}")
            if d != d.quantize(Decimal(1).scaleb(-PRICE_SCALE)):
                raise ValueError(f"price.{field}: at most {PRICE_SCALE} decimal places, got {d}")
            object.__setattr__(self, field, d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "price") -> "Price":
        unknown = set(d) - {"prompt", "cached", "completion"}
        missing = {"prompt", "completion"} - set(d)
        if unknown or missing:
            raise ValueError(f"{where}: needs keys prompt, completion (and optionally cached); "
                             f"missing {sorted(missing)}, unknown {sorted(unknown)}")
        # Without a cached price, cached tokens cost what other prompt tokens cost.
        return cls(prompt=d["prompt"], cached=d.get("cached", d["prompt"]), completion=d["completion"])


# Placeholders, not EXAONE's or anyone's published prices: set real ones with `Pricing.from_file`.
DEFAULT_PRICE = Price(prompt=Decimal("0.20"), cached=Decimal("0.05"), completion=Decimal("0.80"))


class Pricing:
    """Prices per model with a default entry; `cost` gives the exact cost of one request."""

    def __init__(self, models: Mapping[str, Price] | None = None, default: Price = DEFAULT_PRICE):
        self.models = dict(models or {})
        self.default = default

    def price(self, model: str) -> Price:
        return self.models.get(model, self.default)

    def cost(self, model: str, prompt: int, cached: int, completion: int) -> Decimal:
        """Exact USD cost: uncached prompt + cached prompt + completion (reasoning included)."""
        for name, n in (("prompt", prompt), ("cached", cached), ("completion", completion)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{name} tokens: expected an int >= 0, got {n!r}")
        if cached > prompt:
            raise ValueError(f"cached tokens ({cached}) are part of prompt tokens ({prompt}) and cannot exceed them")
        p = self.price(model)
        total = (prompt - cached) * p.prompt + cached * p.cached + completion * p.completion
        return (total / _PER).quantize(Decimal(1).scaleb(-COST_SCALE))  # exact: divisor is 10**6

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Pricing":
        unknown = set(d) - {"default", "models"}
        if unknown:
            raise ValueError(f"pricing: unknown top-level keys {sorted(unknown)} (expected default, models)")
        default = Price.from_dict(d["default"], "pricing.default") if "default" in d else DEFAULT_PRICE
        models = {name: Price.from_dict(v, f"pricing.models.{name}") for name, v in d.get("models", {}).items()}
        return cls(models, default)

    @classmethod
    def from_file(cls, path: str | Path) -> "Pricing":
        path = Path(path)
        if path.suffix.lower() not in (".json", ".toml"):
            raise ValueError(f"{path}: pricing files are .json or .toml")
        text = path.read_text(encoding="utf-8")  # FileNotFoundError names the path
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text, parse_float=Decimal)
        else:
            data = json.loads(text, parse_float=Decimal)
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        def one(p: Price) -> dict:
            return {"prompt": str(p.prompt), "cached": str(p.cached), "completion": str(p.completion)}
        return {"default": one(self.default), "models": {m: one(p) for m, p in self.models.items()}}
