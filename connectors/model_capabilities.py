"""What each model family accepts, so every request is one its provider takes.

Decided by the model's name (or the config's ``behaves_as``), never by the base URL:
Azure, gateways and proxies serve the same models at other URLs with the same rules.
Sources: OpenAI's and Anthropic's API references and the validation errors they return
(``Unsupported value: 'temperature' does not support 0 with this model``,
``Unsupported parameter: 'logprobs' ...``, ``'reasoning_effort' does not support 'minimal'
with this model``), gathered in ``../shared/reference/providers-as-they-are.md``.

Anthropic: no logprobs, and no sampling parameters: ``temperature``/``top_p``/``top_k``
are deprecated (400 "`temperature` is deprecated for this model" from Opus 4.7 on, and
the ``anthropic`` SDK 2.x no longer takes them), so none is sent to any Claude model.

A model no rule names is taken as an open-weight model behind an OpenAI-compatible server
(vLLM, llama.cpp, Ollama, Fireworks, Together): logprobs, any temperature, ``max_tokens``
and JSON-schema constrained output.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Optional

__all__ = ["Capabilities", "capabilities", "REASONING_ALLOWANCE"]


@dataclasses.dataclass(frozen=True)
class Capabilities:
  """One model family's request rules.

  Attributes:
    family: a name for messages and the docs' table.
    logprobs: returns token log probabilities (``logprobs``/``top_logprobs``).
    temperature: accepts a temperature other than its default (else none is sent).
    token_limit: the request field that caps the answer (``max_completion_tokens`` on
      OpenAI's own models, ``max_tokens`` elsewhere).
    reasoning_efforts: accepted ``reasoning_effort`` values, cheapest first; empty for
      a model that does not reason. Reasoning tokens count against the token limit and
      are billed as output.
    structured_output: ``json_schema`` (OpenAI ``response_format``, also llama.cpp and
      vLLM) or None.
    cache_min_tokens: the shortest prefix the provider caches.
    known: the family is documented here (not assumed from an unknown name).
  """
  family: str
  logprobs: bool
  temperature: bool
  token_limit: str
  reasoning_efforts: tuple[str, ...] = ()
  structured_output: Optional[str] = "json_schema"
  cache_min_tokens: int = 1024
  known: bool = True

  @property
  def reasons(self) -> bool:
    return bool(self.reasoning_efforts)

  @property
  def cheapest_effort(self) -> Optional[str]:
    return self.reasoning_efforts[0] if self.reasoning_efforts else None


# Tokens allowed for reasoning on top of the answer, by effort, unless the config says.
# With "minimal"/"none" GPT-5 models mostly reason little or not at all; the allowance
# only caps, it is billed as used.
REASONING_ALLOWANCE = {"none": 0, "minimal": 1024, "low": 4096, "medium": 16384,
                       "high": 32768, "xhigh": 65536}

_OPENAI_REASONING = dict(logprobs=False, temperature=False, token_limit="max_completion_tokens")

# (provider, name pattern, capabilities), first match wins.
_RULES: tuple[tuple[str, re.Pattern, Capabilities], ...] = (
    ("openai", re.compile(r"gpt-5-chat"),
     Capabilities("gpt-5-chat", logprobs=False, temperature=False,
                  token_limit="max_completion_tokens")),
    ("openai", re.compile(r"gpt-5(-mini|-nano)?(-\d{4}-\d{2}-\d{2})?$"),
     Capabilities("gpt-5", reasoning_efforts=("minimal", "low", "medium", "high"),
                  **_OPENAI_REASONING)),
    ("openai", re.compile(r"gpt-5\.1"),
     Capabilities("gpt-5.1", reasoning_efforts=("none", "low", "medium", "high"),
                  **_OPENAI_REASONING)),
    ("openai", re.compile(r"gpt-5\.\d+"),
     Capabilities("gpt-5.2+", reasoning_efforts=("none", "low", "medium", "high", "xhigh"),
                  **_OPENAI_REASONING)),
    ("openai", re.compile(r"o\d(-mini|-pro)?\b"),
     Capabilities("o-series", reasoning_efforts=("low", "medium", "high"),
                  **_OPENAI_REASONING)),
    ("openai", re.compile(r"gpt-4\.1|gpt-4o"),
     Capabilities("gpt-4.1/gpt-4o", logprobs=True, temperature=True,
                  token_limit="max_completion_tokens")),
    ("anthropic", re.compile(r"claude-.*haiku|claude-haiku"),
     Capabilities("claude haiku", logprobs=False, temperature=False, token_limit="max_tokens",
                  structured_output=None, cache_min_tokens=2048)),
    ("anthropic", re.compile(r"claude-"),
     Capabilities("claude", logprobs=False, temperature=False, token_limit="max_tokens",
                  structured_output=None, cache_min_tokens=1024)),
)

_OPEN_WEIGHTS = Capabilities("open-weight (OpenAI-compatible server)", logprobs=True,
                             temperature=True, token_limit="max_tokens", known=False)
_ANTHROPIC_UNKNOWN = Capabilities("anthropic (unknown model)", logprobs=False,
                                  temperature=False, token_limit="max_tokens",
                                  structured_output=None, known=False)
# A model no rule names, by provider; elsewhere an OpenAI-compatible open-weight server's.
_UNKNOWN = {"anthropic": _ANTHROPIC_UNKNOWN}


@functools.lru_cache(maxsize=256)  # asked on every request; a pure function of two names
def capabilities(provider: str, model: str) -> Capabilities:
  """The request rules for ``model`` at ``provider`` (by name, case-insensitive; a
  ``vendor/`` prefix such as ``openai/gpt-5-nano`` on a gateway is ignored)."""
  name = model.lower().rsplit("/", 1)[-1]
  for rule_provider, pattern, caps in _RULES:
    if rule_provider == provider and pattern.match(name):
      return caps
  return _UNKNOWN.get(provider, _OPEN_WEIGHTS)
