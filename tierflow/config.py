"""The run configuration (YAML): models per tier, stages, thresholds, budget.

Prompts, label sets, extraction fields and thresholds live here, not in code.
Values may use ``${VAR}`` or ``${VAR:-default}`` to read the environment (for
base URLs, say). API keys are never put in the file: a model names the
environment variable that holds its key (``api_key_env``).

The file is validated with pydantic, strictly: an unknown key at any depth is an
error naming its path (``stages.1.fields.amount.enmu``), so a typo never turns
into a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any, Literal, Mapping, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, \
    model_validator

from tierflow.files import read_text

__all__ = ["FieldSpec", "ModelConfig", "StageConfig", "RunConfig", "load_config"]

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


@functools.lru_cache(maxsize=64)
def _endpoint_host(base_url: Optional[str], provider: str) -> str:
  """``ModelConfig.endpoint_host``, parsed once per URL (every result row names it)."""
  from urllib.parse import urlparse
  if base_url:
    return urlparse(base_url).netloc or base_url
  from tierflow.connectors.llm_clients import ModelClient
  return ModelClient.of_provider(provider).default_host


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid", frozen=True)


class FieldSpec(_Strict):
  """One extraction field: its type, and optionally allowed values or a pattern."""
  type: Literal["string", "number", "integer", "boolean"] = "string"
  enum: Optional[tuple] = None
  pattern: Optional[str] = None
  description: Optional[str] = None

  @field_validator("pattern")
  @classmethod
  def _compiles(cls, value):
    if value is not None:
      try:
        re.compile(value)
      except re.error as e:
        raise ValueError(f"pattern does not compile: {e}") from None
    return value


class ModelConfig(_Strict):
  """One model endpoint and how to call it.

  What a request may carry follows the model (``connectors/model_capabilities``): a
  setting the model does not take is an error here, before any request.

  Attributes:
    provider: ``openai`` (Chat Completions, any compatible base_url) or ``anthropic``.
    model: model name sent to the endpoint.
    behaves_as: the model whose request rules apply, when ``model`` is a deployment or
      gateway alias (an Azure deployment of gpt-5-nano, say). Default: ``model``.
    base_url: endpoint; None = the provider's default.
    api_key_env: environment variable holding the key (read on the worker).
    price_as: price-book entry to cost calls with (default: ``model``); for a
      self-hosted or stand-in model, the model it stands in for.
    batch_size: records packed into one request.
    concurrency: requests in flight at once per worker.
    rpm / tpm: requests / tokens per minute for every worker process together: in the
      pipelines they share one window through the ledger (``kafka_ledger``); a 429 halves
      what a process claims under, growing back as requests pass.
    max_retries: retries of a failed request (they honour ``retry-after``).
    logprobs: ask for token logprobs; default: where the model returns them. Without
      them the stages ask the model to state its confidence (``verbalised``).
    temperature: default 0 where the model takes a temperature (its own default when
      ``samples`` > 1); models that take only their default (GPT-5 family, o-series,
      Claude) get none.
    samples: small tier only: answers asked per record (that many requests per pack,
      each billed). With more than one, the answer kept is the one the others agree
      with most, and its confidence is the share of samples agreeing with it times their
      mean own confidence (logprob or verbalised): self-consistency, a signal for models
      without logprobs (``pipelines/agreement.py``). Not with temperature 0.
    reasoning_effort: for reasoning models; default their cheapest (``minimal`` on
      gpt-5/-mini/-nano, ``none`` on gpt-5.1+, ``low`` on o-series).
    reasoning_tokens: tokens allowed for reasoning on top of the answer (reasoning
      counts against the token limit and is billed as output); default by effort.
    breaker_failures: failed requests in a row (connection, timeout, 5xx, 401/403, 400)
      after which the endpoint's circuit opens and requests fail at once; 0: never.
    breaker_cooldown_s: how long an open circuit waits before letting one request try.
    structured_output: constrain single-record extraction answers to the fields' JSON
      schema (``response_format: json_schema``); default: where the model has it (OpenAI
      models and OpenAI-compatible servers, not Claude).
    mode: ``sync`` (a request per pack, answered at once) or ``batch`` (bounded runs: the
      tier's requests for an offset batch go to the provider's batch API, billed at the
      price book's ``batch_discount``, answered within 24 h).
    batch_poll_s / batch_max_wait_s: how often a batch is checked, and how long it may
      take before it is cancelled (``--max-batch-wait``).
    batch_fallback: requests a batch did not answer (expired, cancelled, past the wait,
      a request error) are sent synchronously (``sync``) or fail their records (``fail``).
    batch_max_requests / batch_max_bytes: lower the provider's per-batch limits (OpenAI
      50,000 requests and 200 MB per input file, Anthropic 100,000 requests or 256 MB);
      a tier's requests are split into as many batches as the limits need.
    batch_max_enqueued_tokens: the organisation's enqueued-token limit for this model
      (OpenAI); each batch stays under it, and a batch the provider refuses for it
      (other workers' batches share it) is submitted again once others have ended.
    stand_in: a label saying this endpoint is a stand-in, shown in summaries.
  """
  provider: Literal["openai", "anthropic"]
  model: str
  behaves_as: Optional[str] = None
  base_url: Optional[str] = None
  api_key_env: Optional[str] = None
  price_as: Optional[str] = None
  batch_size: int = Field(8, ge=1)
  concurrency: int = Field(4, ge=1)
  rpm: Optional[int] = Field(None, ge=1)
  tpm: Optional[int] = Field(None, ge=1)
  timeout_s: float = Field(60.0, gt=0)
  max_retries: int = Field(4, ge=0)
  logprobs: Optional[bool] = None
  top_logprobs: int = Field(10, ge=0, le=20)
  temperature: Optional[float] = Field(None, ge=0, le=2)
  samples: int = Field(1, ge=1, le=8)
  reasoning_effort: Optional[str] = None
  reasoning_tokens: Optional[int] = Field(None, ge=0)
  breaker_failures: int = Field(5, ge=0)
  breaker_cooldown_s: float = Field(30.0, gt=0)
  structured_output: Optional[bool] = None
  mode: Literal["sync", "batch"] = "sync"
  batch_poll_s: float = Field(30.0, gt=0)
  batch_max_wait_s: float = Field(86_400.0, gt=0)
  batch_fallback: Literal["sync", "fail"] = "sync"
  batch_max_requests: Optional[int] = Field(None, ge=1)
  batch_max_bytes: Optional[int] = Field(None, ge=1024)
  batch_max_enqueued_tokens: Optional[int] = Field(None, ge=1)
  stand_in: Optional[str] = None

  @field_validator("base_url", "api_key_env", "price_as", "behaves_as", "reasoning_effort",
                   mode="before")
  @classmethod
  def _empty_is_none(cls, value):
    return None if value == "" else value

  @model_validator(mode="after")
  def _what_the_model_takes(self):
    caps = self.capabilities
    who = f"{self.model} ({caps.family})"
    if self.logprobs and not caps.logprobs:
      raise ValueError(f"{who} returns no logprobs: drop logprobs (confidence is then "
                       "verbalised) or use a model that has them")
    if self.temperature is not None and not caps.temperature and self.temperature != 1:
      raise ValueError(f"{who} takes only its default temperature: drop temperature")
    if self.samples > 1 and self.temperature == 0:
      raise ValueError(f"samples: {self.samples} needs sampling, and temperature 0 gives "
                       "the same answer each time: drop temperature or set it above 0")
    if self.reasoning_effort is not None:
      if not caps.reasons:
        raise ValueError(f"{who} does not reason: drop reasoning_effort")
      if self.reasoning_effort not in caps.reasoning_efforts:
        raise ValueError(f"{who} takes reasoning_effort "
                         f"{', '.join(caps.reasoning_efforts)}, not {self.reasoning_effort!r}")
    if self.structured_output and not caps.structured_output:
      raise ValueError(f"{who} has no JSON-schema structured output here: drop "
                       "structured_output")
    if self.reasoning_tokens is not None and not caps.reasons:
      raise ValueError(f"{who} does not reason: drop reasoning_tokens")
    return self

  @property
  def endpoint_host(self) -> str:
    """The host the tier's requests go to: the base URL's host[:port], else the provider's
    own API host (what the report names the tier by, with the model that answered)."""
    return _endpoint_host(self.base_url, self.provider)

  @property
  def capabilities(self):
    from tierflow.connectors.model_capabilities import capabilities
    return capabilities(self.provider, self.behaves_as or self.model)

  @property
  def batch_limits(self):
    """The per-batch limits: the provider's, lowered by ``batch_max_*``."""
    from tierflow.connectors.batch_api import BatchLimits, ProviderBatch
    own = ProviderBatch.of_provider(self.provider).limits
    return BatchLimits(min(own.requests, self.batch_max_requests or own.requests),
                       min(own.bytes, self.batch_max_bytes or own.bytes),
                       self.batch_max_enqueued_tokens)

  @property
  def uses_logprobs(self) -> bool:
    return self.capabilities.logprobs if self.logprobs is None else self.logprobs

  @property
  def uses_structured_output(self) -> bool:
    if self.structured_output is None:
      return self.capabilities.structured_output == "json_schema"
    return self.structured_output

  @property
  def effort(self) -> Optional[str]:
    """The reasoning effort requests carry (None for a model that does not reason)."""
    return self.reasoning_effort or self.capabilities.cheapest_effort

  @property
  def reasoning_allowance(self) -> int:
    """Tokens added to each request's limit for reasoning."""
    from tierflow.connectors.model_capabilities import REASONING_ALLOWANCE
    if not self.capabilities.reasons:
      return 0
    if self.reasoning_tokens is not None:
      return self.reasoning_tokens
    return REASONING_ALLOWANCE.get(self.effort, 4096)

  @property
  def price_key(self) -> str:
    return self.price_as or self.model


class Example(_Strict):
  """A worked example for a stage's prompt: a record's text and its correct answer."""
  text: str
  answer: Any


class StageConfig(_Strict):
  """One stage. ``threshold``: records whose small-tier confidence is below it escalate
  (a confidence in [0, 1]; ``inf`` escalates every record). ``output``: the result column
  holding its answer (and ``<output>_confidence``); default the kind's column (``label``,
  ``extraction``, ``summary``) for the first stage of a kind, the stage's name for others.

  ``examples`` (few-shot) go in the shared system prompt after the task: they help a small
  model, and they are what makes the shared prefix long enough for the providers' prompt
  caches (1,024 tokens on OpenAI and on Claude Sonnet/Opus, more on Haiku), whose reads
  cost a tenth of the input price.
  """
  name: str
  kind: str
  instructions: str = ""
  examples: tuple[Example, ...] = ()
  labels: tuple[str, ...] = ()
  fields: dict[str, FieldSpec] = Field(default_factory=dict)
  max_words: int = 40
  threshold: float = 0.5
  max_output_tokens: Optional[int] = Field(None, ge=1)
  output: Optional[str] = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

  @field_validator("fields", mode="before")
  @classmethod
  def _bare_fields(cls, value):
    # `order_id:` with nothing under it is a string field.
    if isinstance(value, Mapping):
      return {k: ({} if v is None else v) for k, v in value.items()}
    return value

  @model_validator(mode="after")
  def _kind_checks(self):
    from tierflow.pipelines.stage_kinds import KINDS
    if self.kind not in KINDS:
      raise ValueError(f"stage {self.name}: kind must be one of {', '.join(KINDS)}")
    KINDS[self.kind].check(self)
    for n, example in enumerate(self.examples, 1):
      problem = KINDS[self.kind](self).example_problem(example.answer)
      if problem:
        raise ValueError(f"stage {self.name}: example {n}: {problem}")
    _check_threshold(self.name, self.threshold)
    return self

  @property
  def kind_impl(self):
    """The stage kind object (``tierflow.pipelines.stage_kinds``) for this stage."""
    from tierflow.pipelines.stage_kinds import kind_of
    return kind_of(self)

  def output_tokens_per_record(self) -> int:
    """Output budget per record: the answer plus its JSON framing."""
    return self.max_output_tokens or self.kind_impl.output_tokens_per_record()


def _check_threshold(stage: str, threshold: Any) -> None:
  """A threshold is a confidence in [0, 1], or inf: escalate every record (what a
  calibration that could not certify the stage gives). ``70`` or ``1.1`` is an error."""
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
    raise ValueError(f"stage {stage}: threshold must be a number, got {threshold!r}")
  if not (0.0 <= threshold <= 1.0 or threshold == math.inf):
    raise ValueError(f"stage {stage}: threshold {threshold!r} is not a confidence in [0, 1] "
                     "or inf (escalate every record)")


def _with_outputs(stages: tuple) -> tuple:
  """The stages with their output columns set (see ``StageConfig.output``); ValueError
  when two stages would write one column."""
  from tierflow.pipelines.stage_kinds import output_columns
  out, owner = [], {}
  for s, column in zip(stages, output_columns(stages)):
    for name in (column, f"{column}_confidence"):
      if name in owner:
        raise ValueError(f"stages {owner[name]} and {s.name} would both write column "
                         f"{name!r}: give one of them another output: NAME")
      owner[name] = s.name
    out.append(s if s.output == column else s.model_copy(update={"output": column}))
  return tuple(out)


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
  # stage name -> tierflow.learned_router.LearnedRouter: its score, not the confidence,
  # is compared with the stage's threshold (from a --calibration file)
  routers: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # Stages that escalate every record (threshold inf: what calibration writes for a stage it
  # could not certify) are not sent to the small tier, whose answer could not be kept
  # (``--skip-small-when-uncertified``). Their runs hold no small answers to calibrate from.
  skip_small_when_uncertified: bool = False

  def __post_init__(self):
    object.__setattr__(self, "stages", tuple(self.stages))
    if not self.stages:
      raise ValueError("config needs at least one stage")
    for stage in self.stages:
      if not isinstance(stage, StageConfig):
        raise TypeError(f"stages are StageConfigs, got {type(stage).__name__} {stage!r}")
      _check_threshold(stage.name, stage.threshold)
    for tier in ("small", "frontier"):
      if not isinstance(getattr(self, tier), ModelConfig):
        raise TypeError(f"{tier} is a ModelConfig, got {type(getattr(self, tier)).__name__}")
    names = [s.name for s in self.stages]
    if len(set(names)) != len(names):
      raise ValueError(f"stage names must be unique: {names}")
    object.__setattr__(self, "stages", _with_outputs(self.stages))
    if self.budget_usd is not None and self.budget_usd < 0:
      raise ValueError("budget_usd must be >= 0")
    if self.frontier.samples != 1:
      raise ValueError("samples apply to the small tier, whose confidence decides "
                       "escalation: drop samples from the frontier model")
    _check_template(self.text, self.schema)

  def stage(self, name: str) -> StageConfig:
    for s in self.stages:
      if s.name == name:
        return s
    raise KeyError(name)

  def with_model(self, tier: str, **changes) -> "RunConfig":
    """A copy with the ``small`` or ``frontier`` model changed (and validated), e.g.
    ``config.with_model("small", base_url="http://localhost:8080/v1", model="my-8b")``."""
    if tier not in ("small", "frontier"):
      raise ValueError(f"tier must be small or frontier, not {tier!r}")
    model = ModelConfig(**{**getattr(self, tier).model_dump(), **changes})
    return dataclasses.replace(self, **{tier: model})

  def with_routers(self, routers: Mapping[str, Any]) -> "RunConfig":
    unknown = sorted(set(routers) - {s.name for s in self.stages})
    if unknown:
      raise ValueError(f"learned routers for unknown stage(s) {unknown}")
    return dataclasses.replace(self, routers=dict(routers))

  @property
  def small_skipped(self) -> frozenset:
    """Names of the stages not sent to the small tier (``skip_small_when_uncertified``)."""
    if not self.skip_small_when_uncertified:
      return frozenset()
    return frozenset(s.name for s in self.stages if math.isinf(float(s.threshold)))

  def with_thresholds(self, thresholds: Mapping[str, float]) -> "RunConfig":
    stages = tuple(s.model_copy(update={"threshold": float(thresholds[s.name])})
                   if s.name in thresholds else s for s in self.stages)
    return dataclasses.replace(self, stages=stages)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
    try:
      f = _RunFile.model_validate(_expand(dict(data)))
    except ValidationError as e:
      raise ValueError("config: " + "; ".join(_error_line(err) for err in e.errors())) from None
    return cls(name=f.name, schema=f.input.schema_name, text=f.input.text,
               small=f.models.small, frontier=f.models.frontier, stages=tuple(f.stages),
               budget_usd=f.budget_usd, price_book=f.price_book)


def _error_line(err: Mapping[str, Any]) -> str:
  path = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
  message = "unknown key" if err["type"] == "extra_forbidden" else \
      err["msg"].removeprefix("Value error, ")
  return f"{path}: {message}" if path else message


def _check_template(text: str, schema_name: str) -> None:
  """Raises ValueError when the input template names a field the input rows cannot have
  (a typo would otherwise fail every record)."""
  from tierflow import schemas
  from tierflow.pipelines.prompts import template_fields
  named = template_fields(text)
  fields = set(schemas.field_names(schemas.load(schema_name))) | set(
      schemas.field_names(schemas.load("source_metadata")))
  unknown = sorted(named - fields)
  if unknown:
    raise ValueError(f"input.text names {', '.join(unknown)}, not a field of schema "
                     f"{schema_name!r} ({', '.join(sorted(fields))})")


class _InputSection(_Strict):
  schema_name: str = Field("ticket", alias="schema")
  text: str = "{body}"


class _ModelsSection(_Strict):
  small: ModelConfig
  frontier: ModelConfig


class _RunFile(_Strict):
  name: str = "run"
  input: _InputSection = _InputSection()
  models: _ModelsSection
  stages: list[StageConfig] = Field(min_length=1)
  budget_usd: Optional[float] = Field(None, ge=0)
  price_book: Optional[str] = None

  @field_validator("budget_usd", mode="before")
  @classmethod
  def _none(cls, value):
    return None if value in ("", "none", "None") else value


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
  except ValueError as e:
    raise ValueError(f"{path_or_name}: {e}") from None
