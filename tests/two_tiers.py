"""A responder for ``LocalProviderServer`` whose two tiers disagree: the frontier (model
``frontier``) is the keyword stand-in, the small tier (any other model) the same stand-in
knowing only the first three keywords of each category, so it misfiles some tickets, and
its confidence says which."""

from __future__ import annotations

from tierflow_local.standin_model import DEFAULT_KEYWORDS, KeywordStandIn


class TwoTiers:
  """Answers requests to ``frontier`` with the full stand-in, others with the weaker one."""

  def __init__(self):
    self.frontier = KeywordStandIn()
    self.small = KeywordStandIn({k: v[:3] for k, v in DEFAULT_KEYWORDS.items()})

  def __call__(self, request):
    return (self.frontier if request.model == "frontier" else self.small)(request)
