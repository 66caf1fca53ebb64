"""The request rules of real models, enforced by the local endpoints (``--emulate``).

Written from what api.openai.com and api.anthropic.com answer (the error texts their
users report, gathered in ``../shared/reference/providers-as-they-are.md``), on purpose
apart from tierflow's own table (``connectors/model_capabilities.py``): a request tierflow
builds wrongly must fail here as it would there, not agree with the same mistake.

* GPT-5 family (gpt-5, gpt-5-mini, gpt-5-nano) and gpt-5.1+: only the default
  temperature; no ``top_p``, ``logprobs``, ``top_logprobs``; ``max_completion_tokens``,
  never ``max_tokens``; ``reasoning_effort`` from the model's set (default ``medium`` on
  gpt-5, ``none`` on gpt-5.1+). Reasoning tokens are spent first, count against
  ``max_completion_tokens`` and are billed as output: with too small an allowance the
  answer comes back empty with ``finish_reason: "length"``.
* Prompt caching: prefixes shorter than the model's minimum are not cached (OpenAI and
  Claude Sonnet/Opus 1,024 tokens, Claude Haiku 2,048), whatever ``cache_control`` says.
* Claude models: no logprobs and no other field the Messages API does not know
  ("Extra inputs are not permitted"); ``max_tokens`` required; ``temperature`` in [0, 1]
  up to the 4.6 generation, and from Opus 4.7 on (Opus 4.8/5, Sonnet 5, Fable) any
  ``temperature``/``top_p``/``top_k`` is a 400 "`temperature` is deprecated for this
  model".
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

__all__ = ["RequestRejected", "ModelRules", "rules_for"]


class RequestRejected(Exception):
  """What the provider answers with HTTP 400."""

  def __init__(self, message: str, param: Optional[str] = None,
               code: Optional[str] = None):
    super().__init__(message)
    self.message, self.param, self.code = message, param, code


def _unsupported_parameter(name: str, hint: str = "") -> RequestRejected:
  return RequestRejected(f"Unsupported parameter: '{name}' is not supported with this "
                         f"model.{hint}", param=name, code="unsupported_parameter")


@dataclasses.dataclass(frozen=True)
class ModelRules:
  """One family's rules. ``reasoning`` maps each accepted effort to the reasoning tokens
  the emulated model spends at it (deterministic, so tests can reason about them)."""
  family: str
  provider: str
  reasoning: Mapping[str, int] = dataclasses.field(default_factory=dict)
  default_effort: Optional[str] = None
  sampling: bool = True  # takes temperature/top_p/top_k (Anthropic)
  # The shortest prefix the provider caches: OpenAI's automatic caching and Claude
  # Sonnet/Opus from 1,024 tokens, Haiku from 2,048; shorter prefixes are not cached.
  cache_min_tokens: int = 1024

  def check(self, body: Mapping[str, Any]) -> None:
    if self.provider == "openai":
      self._check_openai(body)
    else:
      self._check_anthropic(body)

  def _check_openai(self, body: Mapping[str, Any]) -> None:
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1:
      raise RequestRejected(
          f"Unsupported value: 'temperature' does not support {temperature} with this "
          "model. Only the default (1) value is supported.", param="temperature",
          code="unsupported_value")
    for name in ("top_p", "top_logprobs"):
      if name in body:
        raise _unsupported_parameter(name)
    if body.get("logprobs"):
      raise _unsupported_parameter("logprobs")
    if "max_tokens" in body:
      raise _unsupported_parameter("max_tokens", " Use 'max_completion_tokens' instead.")
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in self.reasoning:
      allowed = ", ".join(f"'{e}'" for e in self.reasoning)
      raise RequestRejected(
          f"Unsupported value: 'reasoning_effort' does not support {effort!r} with this "
          f"model. Supported values are: {allowed}.", param="reasoning_effort",
          code="unsupported_value")

  _ANTHROPIC_FIELDS = frozenset({
      "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
      "temperature", "top_k", "top_p", "tools", "tool_choice", "thinking", "service_tier",
      "container", "mcp_servers", "context_management", "output_config"})

  def _check_anthropic(self, body: Mapping[str, Any]) -> None:
    for name in body:
      if name not in self._ANTHROPIC_FIELDS:
        raise RequestRejected(f"{name}: Extra inputs are not permitted", param=name)
    if not self.sampling:
      for name in ("temperature", "top_p", "top_k"):
        if name in body:
          raise RequestRejected(f"`{name}` is deprecated for this model.", param=name)
    temperature = body.get("temperature")
    if temperature is not None and not 0 <= temperature <= 1:
      raise RequestRejected("temperature: Input should be less than or equal to 1",
                            param="temperature")
    if temperature is not None and body.get("top_p") is not None:
      raise RequestRejected("`temperature` and `top_p` cannot both be specified for this "
                            "model. Please use only one.")

  def reasoning_tokens(self, body: Mapping[str, Any]) -> int:
    """What the model spends reasoning on this request (0 for a model that does not)."""
    if not self.reasoning:
      return 0
    return self.reasoning[body.get("reasoning_effort") or self.default_effort]

  def token_limit(self, body: Mapping[str, Any]) -> Optional[int]:
    """The request's cap on reasoning plus answer."""
    key = "max_completion_tokens" if self.provider == "openai" else "max_tokens"
    value = body.get(key)
    return value if isinstance(value, int) else None


_GPT5 = {"minimal": 16, "low": 512, "medium": 2048, "high": 8192}
_GPT51 = {"none": 0, "low": 512, "medium": 2048, "high": 8192}

_FAMILIES: tuple[tuple[re.Pattern, ModelRules], ...] = (
    (re.compile(r"gpt-5(-mini|-nano)?(-\d{4}-\d{2}-\d{2})?$"),
     ModelRules("gpt-5", "openai", _GPT5, "medium")),
    (re.compile(r"gpt-5\.1"), ModelRules("gpt-5.1", "openai", _GPT51, "none")),
    (re.compile(r"gpt-5\.\d+"),
     ModelRules("gpt-5.2+", "openai", {**_GPT51, "xhigh": 16384}, "none")),
    (re.compile(r"claude-(opus-4-[7-9]|opus-[5-9]|sonnet-[5-9]|fable|mythos)"),
     ModelRules("claude (sampling removed)", "anthropic", sampling=False)),
    (re.compile(r"claude-(.*-)?haiku"), ModelRules("claude haiku", "anthropic",
                                                   cache_min_tokens=2048)),
    (re.compile(r"claude-"), ModelRules("claude", "anthropic")),
)


def rules_for(model: str) -> Optional[ModelRules]:
  """The rules of a model this module emulates, by name; None for any other."""
  for pattern, rules in _FAMILIES:
    if pattern.match(model.lower()):
      return rules
  return None
