"""The run configuration (YAML): models per tier, stages, thresholds, budget.

Prompts, label sets, extraction fields and thresholds live here, not in code.
Values may use ``${VAR}`` or ``${VAR:-default}`` to read the environment (for
base URLs, say). API keys are never put in the file: a model names the
environment variable that holds its key (``api_key_env``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional

import yaml

from tierflow.files import read_text

__all__ = ["ModelConfig", "StageConfig", "RunConfig", "load_config"]

PROVIDERS = ("openai", "anthropic")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any) -> Any:
  if isinstance(value, str):
    def sub(m):
      if m.group(1) in os.environ:
        return os.environ[m.group(1)]
      if m.group(2) is not None:
        return m.group(2)
      raise ValueError(f"config needs environment variable {m.group(1)}")
    return _ENV_RE.sub(sub, value)
  if isinstance(value, list):
    return [_expand(v) for v in value]
  if isinstance(value, dict):
    return {k: _expand(v) for k, v in value.items()}
  return value


def _coerce(value: Any, default: Any, where: str) -> Any:
  """Strings from ``${VAR}`` expansion take the type of the field's default."""
  if (not isinstance(value, str) or isinstance(default, str) or default is None
      or default is dataclasses.MISSING):
    return value
  try:
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(value)
      return value.lower() in ("true", "1", "yes")
    return type(default)(value)
  except ValueError:
    raise ValueError(f"{where}: {value!r} is not a {type(default).__name__}") from None


def _take(data: Mapping[str, Any], cls, where: str) -> dict:
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = set(data) - set(fields)
  if unknown:
    raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
  return {k: _coerce(v, fields[k].default, f"{where}.{k}") for k, v in data.items()}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """One model endpoint and how to call it.

  Attributes:
    provider: ``openai`` (Chat Completions, any compatible base_url) or ``anthropic``.
    model: model name sent to the endpoint.
    base_url: endpoint; None = the provider's default.
    api_key_env: environment variable holding the key (read on the worker).
    price_as: price-book entry to cost calls with (default: ``model``); for a
      self-hosted or stand-in model, the model it stands in for.
    batch_size: records packed into one request.
    concurrency: requests in flight at once per worker thread.
    rpm / tpm: client-side requests / tokens per minute limits per process.
    max_retries: retries of a failed request (they honour ``retry-after``).
    logprobs: ask for token logprobs (OpenAI-compatible endpoints only).
    stand_in: a label saying this endpoint is a stand-in, shown in summaries.
  """
  provider: str
  model: str
  base_url: Optional[str] = None
  api_key_env: Optional[str] = None
  price_as: Optional[str] = None
  batch_size: int = 8
  concurrency: int = 4
  rpm: Optional[int] = None
  tpm: Optional[int] = None
  timeout_s: float = 60.0
  max_retries: int = 4
  logprobs: bool = True
  top_logprobs: int = 10
  temperature: float = 0.0
  stand_in: Optional[str] = None

  def __post_init__(self):
    if self.provider not in PROVIDERS:
      raise ValueError(f"model {self.model}: provider must be one of {PROVIDERS}")
    for name in ("batch_size", "concurrency"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"model {self.model}: {name} must be >= 1")
    if self.provider == "anthropic" and self.logprobs:
      object.__setattr__(self, "logprobs", False)  # the Messages API has none

  @property
  def price_key(self) -> str:
    return self.price_as or self.model


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One stage. ``threshold``: records whose small-tier confidence is below it escalate."""
  name: str
  kind: str
  instructions: str = ""
  labels: tuple = ()
  fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  max_words: int = 40
  threshold: float = 0.5
  max_output_tokens: Optional[int] = None

  def __post_init__(self):
    from tierflow.pipelines.stage_kinds import KINDS
    if self.kind not in KINDS:
      raise ValueError(f"stage {self.name}: kind must be one of {', '.join(KINDS)}")
    object.__setattr__(self, "labels", tuple(self.labels))
    KINDS[self.kind].check(self)
    # Above 1 (a calibration that could not certify: +inf) escalates every record.
    if not float(self.threshold) >= 0.0:
      raise ValueError(f"stage {self.name}: threshold must be >= 0")

  @property
  def kind_impl(self):
    """The stage kind object (``tierflow.pipelines.stage_kinds``) for this stage."""
    from tierflow.pipelines.stage_kinds import kind_of
    return kind_of(self)

  def output_tokens_per_record(self) -> int:
    """Output budget per record: the answer plus its JSON framing."""
    return self.max_output_tokens or self.kind_impl.output_tokens_per_record()


@dataclasses.dataclass(frozen=True)
class RunConfig:
  name: str
  schema: str
  text: str
  small: ModelConfig
  frontier: ModelConfig
  stages: tuple
  budget_usd: Optional[float] = None
  price_book: Optional[str] = None

  def __post_init__(self):
    if not self.stages:
      raise ValueError("config needs at least one stage")
    names = [s.name for s in self.stages]
    if len(set(names)) != len(names):
      raise ValueError(f"stage names must be unique: {names}")
    kinds = [s.kind for s in self.stages]
    if len(set(kinds)) != len(kinds):
      raise ValueError(f"at most one stage of each kind (their outputs are named by kind): "
                       f"{kinds}")
    if self.budget_usd is not None and self.budget_usd < 0:
      raise ValueError("budget_usd must be >= 0")

  def stage(self, name: str) -> StageConfig:
    for s in self.stages:
      if s.name == name:
        return s
    raise KeyError(name)

  def with_thresholds(self, thresholds: Mapping[str, float]) -> "RunConfig":
    stages = tuple(dataclasses.replace(s, threshold=float(thresholds[s.name]))
                   if s.name in thresholds else s for s in self.stages)
    return dataclasses.replace(self, stages=stages)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
    data = _expand(dict(data))
    _take(data, _RawRun, "config")
    models = data.get("models") or {}
    for tier in ("small", "frontier"):
      if tier not in models:
        raise ValueError(f"config: models.{tier} is required")
    small = ModelConfig(**_take(models["small"], ModelConfig, "models.small"))
    frontier = ModelConfig(**_take(models["frontier"], ModelConfig, "models.frontier"))
    stages = tuple(StageConfig(**_take(s, StageConfig, f"stages[{i}]"))
                   for i, s in enumerate(data.get("stages") or []))
    inp = data.get("input") or {}
    return cls(name=data.get("name", "run"), schema=inp.get("schema", "ticket"),
               text=inp.get("text", "{body}"), small=small, frontier=frontier, stages=stages,
               budget_usd=None if data.get("budget_usd") in (None, "", "none") else float(
                   data["budget_usd"]), price_book=data.get("price_book"))


@dataclasses.dataclass
class _RawRun:
  name: str = ""
  input: Any = None
  models: Any = None
  stages: Any = None
  budget_usd: Any = None
  price_book: Any = None


def load_config(path_or_name: str) -> RunConfig:
  """A config from a YAML path, or a bundled one by name (``tickets``, ``documents``)."""
  from importlib import resources
  bundled = resources.files("tierflow").joinpath("data", f"{path_or_name}.yaml")
  if not path_or_name.endswith((".yaml", ".yml")) and bundled.is_file():
    text = bundled.read_text("utf-8")
  else:
    text = read_text(path_or_name)
  try:
    data = yaml.safe_load(text)
  except yaml.YAMLError as e:
    where = getattr(e, "problem_mark", None)
    at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
    raise ValueError(f"config {path_or_name} is not valid YAML{at}: "
                     f"{getattr(e, 'problem', None) or e}") from None
  if not isinstance(data, dict):
    raise ValueError(f"config {path_or_name} is not a YAML mapping of settings")
  try:
    return RunConfig.from_dict(data)
  except (TypeError, KeyError) as e:
    raise ValueError(f"config {path_or_name}: {e}") from None
