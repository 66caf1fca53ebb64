"""One class per model provider, chosen by constructing their base class.

``ModelClient(cfg)`` is the ``OpenAIChat`` or ``AnthropicMessages`` of ``cfg.provider``,
``ProviderBatch(client, ...)`` the ``OpenAIBatches`` or ``AnthropicBatches`` of its
client's: each subclass names its provider in its class statement (``provider=``), and
nothing else in tierflow compares provider names.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = ["ByProvider"]


class ByProvider:
  """A base whose subclasses each serve one provider.

  The base declares its own ``_PROVIDERS = {}``, what it is (``_what``, for errors) and
  reads the provider from its constructor's arguments (``_provider_of``).
  """

  provider: ClassVar[str] = ""
  _PROVIDERS: ClassVar[dict]
  _what: ClassVar[str] = "class"

  def __init_subclass__(cls, provider: str = "", **kwargs):
    super().__init_subclass__(**kwargs)
    if provider:
      cls.provider = provider
      cls._PROVIDERS[provider] = cls

  @classmethod
  def of_provider(cls, provider: str) -> type:
    """The subclass serving ``provider`` (ValueError if there is none)."""
    try:
      return cls._PROVIDERS[provider]
    except KeyError:
      raise ValueError(f"no {cls._what} for provider {provider!r} "
                       f"(known: {', '.join(sorted(cls._PROVIDERS))})") from None

  @classmethod
  def _provider_of(cls, *args: Any, **kwargs: Any) -> str:
    raise NotImplementedError

  def __new__(cls, *args, **kwargs):
    if not cls.provider:
      cls = cls.of_provider(cls._provider_of(*args, **kwargs))
    return super().__new__(cls)
