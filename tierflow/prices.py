"""The price book (dated list prices, kept as data) and what a call costs."""

from __future__ import annotations

import dataclasses
from importlib import resources
from typing import Any, Mapping, Optional

import yaml

__all__ = ["Price", "PriceBook", "Usage", "load_price_book"]

_PER = 1_000_000


@dataclasses.dataclass(frozen=True)
class Usage:
  """Billed tokens of one call, or one record's share of it.

  ``input_tokens`` excludes cache reads and writes (Anthropic's convention;
  OpenAI's ``prompt_tokens`` include ``cached_tokens``, which clients subtract).
  ``reasoning_tokens`` are part of ``output_tokens`` (billed as output), shown apart.
  """
  input_tokens: int = 0
  output_tokens: int = 0
  cache_read_tokens: int = 0
  cache_write_tokens: int = 0
  reasoning_tokens: int = 0

  def __add__(self, other: "Usage") -> "Usage":
    return Usage(self.input_tokens + other.input_tokens,
                 self.output_tokens + other.output_tokens,
                 self.cache_read_tokens + other.cache_read_tokens,
                 self.cache_write_tokens + other.cache_write_tokens,
                 self.reasoning_tokens + other.reasoning_tokens)

  @property
  def prompt_tokens(self) -> int:
    return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens


@dataclasses.dataclass(frozen=True)
class Price:
  """USD per million tokens."""
  input: float
  output: float
  cache_read: Optional[float] = None
  cache_write: Optional[float] = None
  batch_discount: float = 0.0

  def cost(self, usage: Usage, *, batch_api: bool = False) -> float:
    cache_read = self.input if self.cache_read is None else self.cache_read
    cache_write = self.input if self.cache_write is None else self.cache_write
    usd = (usage.input_tokens * self.input + usage.output_tokens * self.output
           + usage.cache_read_tokens * cache_read
           + usage.cache_write_tokens * cache_write) / _PER
    return usd * (1 - self.batch_discount) if batch_api else usd


@dataclasses.dataclass(frozen=True)
class PriceBook:
  version: str
  prices: Mapping[str, Price]

  def price(self, model: str) -> Price:
    try:
      return self.prices[model]
    except KeyError:
      raise ValueError(
          f"model {model!r} is not in price book {self.version}; add it, or set "
          f"price_as: to a listed model ({', '.join(sorted(self.prices))})") from None

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "PriceBook":
    if "version" not in data or "models" not in data:
      raise ValueError("a price book needs 'version' and 'models'")
    prices = {}
    for name, p in data["models"].items():
      try:
        prices[name] = Price(float(p["input"]), float(p["output"]),
                             _opt(p.get("cache_read")), _opt(p.get("cache_write")),
                             float(p.get("batch_discount", 0.0)))
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"price book entry {name!r} is invalid: {e}") from e
      if min(prices[name].input, prices[name].output) < 0:
        raise ValueError(f"price book entry {name!r} has a negative price")
    return cls(str(data["version"]), prices)


def _opt(value) -> Optional[float]:
  return None if value is None else float(value)


def load_price_book(path: Optional[str] = None) -> PriceBook:
  """The bundled price book, or one from a YAML file."""
  if path:
    from tierflow.files import read_text
    return PriceBook.from_dict(yaml.safe_load(read_text(path)))
  text = resources.files("tierflow").joinpath("data", "price_book.yaml").read_text("utf-8")
  return PriceBook.from_dict(yaml.safe_load(text))
