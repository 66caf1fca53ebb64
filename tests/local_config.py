"""A bundled config (tickets by default) pointed at the local endpoints, for tests.

The small tier is the OpenAI-compatible endpoint's model ``small`` priced as
gpt-5-nano, the frontier the Anthropic endpoint's ``frontier`` priced as
claude-sonnet-4-6 (names no request rule applies to: the stand-in answers them).
"""

import pathlib
from typing import Any, Callable, Mapping, Optional

import yaml

CONFIGS = pathlib.Path(__file__).parents[1] / "tierflow/data"
TICKETS = CONFIGS / "tickets.yaml"


def local_config(path: pathlib.Path, server, *, pipeline: str = "tickets",
                 budget: Optional[float] = None,
                 small: Mapping[str, Any] = {}, frontier: Mapping[str, Any] = {},
                 edit: Optional[Callable[[dict], None]] = None) -> str:
  """Writes ``pipeline``'s bundled config to ``path`` (``small``/``frontier``: model settings
  on top; ``edit``: any other change to the dict) and returns the path."""
  config = yaml.safe_load((CONFIGS / f"{pipeline}.yaml").read_text())
  config["budget_usd"] = budget
  config["models"]["small"].update({
      "base_url": server.openai_base_url, "model": "small", "api_key_env": "",
      "price_as": "gpt-5-nano", **small})
  config["models"]["frontier"].update({
      "provider": "anthropic", "base_url": server.anthropic_base_url, "model": "frontier",
      "api_key_env": "", "price_as": "claude-sonnet-4-6", **frontier})
  if edit is not None:
    edit(config)
  path.write_text(yaml.safe_dump(config))
  return str(path)


def pipeline_config(tmp_path: pathlib.Path, server, pipeline: str,
                    budget: Optional[float] = None) -> str:
  """``pipeline``'s config at ``TMP/PIPELINE.yaml``: no keys, packs of 4 on both tiers."""
  return local_config(tmp_path / f"{pipeline}.yaml", server, pipeline=pipeline, budget=budget,
                      small=dict(api_key_env=None, batch_size=4),
                      frontier=dict(api_key_env=None, batch_size=4))
