"""A run config is checked when it is built: thresholds, argument types, template fields."""

import math

import pytest

from tierflow.config import RunConfig, StageConfig, load_config

TICKETS = load_config("tickets")


def _classify(**kw) -> StageConfig:
  return StageConfig(**{"name": "classify", "kind": "classify", "labels": ("a", "b"), **kw})


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0, math.inf, "inf"])
def test_a_threshold_is_a_confidence_or_inf(threshold):
  assert _classify(threshold=threshold).threshold in (0.0, 0.5, 1.0, math.inf)


@pytest.mark.parametrize("threshold", [70, 1.1, 2.0, -0.1, math.nan])
def test_a_threshold_outside_0_1_is_refused(threshold):
  """`threshold: 70` (a percentage) was accepted and escalated everything."""
  with pytest.raises(ValueError, match="not a confidence in \\[0, 1\\] or inf"):
    _classify(threshold=threshold)
  with pytest.raises(ValueError, match="not a confidence in \\[0, 1\\] or inf"):
    TICKETS.with_thresholds({"classify": threshold})


def test_the_yaml_file_refuses_an_out_of_range_threshold():
  data = {"models": {"small": {"provider": "openai", "model": "gpt-5-nano"},
                     "frontier": {"provider": "anthropic", "model": "claude-sonnet-4-6"}},
          "stages": [{"name": "c", "kind": "classify", "labels": ["a", "b"], "threshold": 70}]}
  with pytest.raises(ValueError, match="stages.0: .*threshold 70"):
    RunConfig.from_dict(data)
  data["stages"][0]["threshold"] = "inf"
  assert RunConfig.from_dict(data).stages[0].threshold == math.inf


def test_argument_types_are_checked():
  with pytest.raises(TypeError, match="stages are StageConfigs, got dict"):
    RunConfig("r", "ticket", "{body}", TICKETS.small, TICKETS.frontier,
              ({"name": "c", "kind": "classify"},))
  with pytest.raises(TypeError, match="frontier is a ModelConfig, got str"):
    RunConfig("r", "ticket", "{body}", TICKETS.small, "claude", (_classify(),))


def test_a_template_field_the_schema_lacks_is_refused():
  with pytest.raises(ValueError, match="input.text names subjct, not a field of schema"):
    RunConfig("r", "ticket", "{subjct}: {body}", TICKETS.small, TICKETS.frontier,
              (_classify(),))
