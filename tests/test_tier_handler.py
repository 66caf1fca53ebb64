"""One tier inside Beam's own RunInference: answers per row, failures raise unless the
user asks for exception handling, and each request is sent 1 + max_retries times at most."""

import apache_beam as beam
import pytest
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tierflow.config import load_config
from tierflow.pipelines.tier_handler import TierModelHandler
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.standin_model import KeywordStandIn

ROWS = [
    {"ticket_id": "T1", "created_at": 1767225600000, "subject": "Refund", "channel": "email",
     "body": "I was charged twice for my invoice, please refund the payment."},
    {"ticket_id": "T2", "created_at": 1767225600000, "subject": "Late", "channel": "chat",
     "body": "My parcel never arrived, where is the delivery?"},
]


def _config(server, **small):
  return (load_config("tickets")
          .with_model("small", model="small", base_url=server.openai_base_url, api_key_env=None,
                      price_as="gpt-5-nano", **small)
          .with_model("frontier", provider="anthropic", model="frontier",
                      base_url=server.anthropic_base_url, api_key_env=None,
                      price_as="claude-sonnet-4-6"))


@pytest.mark.parametrize("tier", ["small", "frontier"])
def test_a_tier_answers_a_stage_inside_run_inference(tier):
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier")) as server:
    handler = TierModelHandler(_config(server), stage="classify", tier=tier)
    with TestPipeline() as p:
      answers = (p | beam.Create(ROWS) | RunInference(handler)
                 | beam.Map(lambda r: (r.example["ticket_id"], r.inference.value,
                                       r.inference.cost_usd > 0, r.inference.error)))
      assert_that(answers, equal_to([("T1", "billing", True, None),
                                     ("T2", "shipping", True, None)]))
    paths = {q.path for q in server.requests}
  assert paths == ({"/v1/chat/completions"} if tier == "small" else {"/v1/messages"})


def test_decoded_rows_beam_rows_with_a_schema_are_answered_as_dicts_are():
  from tierflow import transforms as tf
  codec = tf.make_codec("json", tf.schemas.load("ticket"))
  records = [tf.KafkaRecord("tickets", 0, i, 1767225600000, None, codec.encode(row))
             for i, row in enumerate(ROWS)]
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier")) as server:
    with TestPipeline() as p:
      answers = (p | beam.Create(records) | tf.DecodeRecords(codec)
                 | RunInference(TierModelHandler(_config(server), stage="classify"))
                 | beam.Map(lambda r: (r.example.record_id, r.inference.value)))
      assert_that(answers, equal_to([("tickets-0-0", "billing"), ("tickets-0-1", "shipping")]))


def test_a_failing_endpoint_raises_unless_handled_and_is_asked_1_plus_retries_times():
  with LocalProviderServer(KeywordStandIn(), models=("small", "frontier"),
                           faults=["server_error:-1"]) as server:
    config = _config(server, max_retries=2, batch_size=8, breaker_failures=0)
    with pytest.raises(Exception, match="server_error"):
      with TestPipeline() as p:
        _ = p | beam.Create(ROWS) | RunInference(TierModelHandler(config, "classify"))
    attempts = len([q for q in server.requests if q.path == "/v1/chat/completions"])
    assert attempts == 3, "one request, sent 1 + max_retries times (Beam's retry is off)"

    with TestPipeline() as p:
      main, failed = (p | "Rows" >> beam.Create(ROWS)
                      | RunInference(TierModelHandler(config, "classify"))
                      .with_exception_handling())
      assert_that(main, equal_to([]), label="no answers")
      assert_that(failed.failed_inferences | beam.Map(lambda f: len(f[0]))
                  | beam.CombineGlobally(sum), equal_to([2]), label="both rows failed")


def test_the_handler_checks_its_arguments_when_constructed():
  config = load_config("tickets")
  with pytest.raises(TypeError, match="RunConfig"):
    TierModelHandler({"stages": []}, "classify")
  with pytest.raises(ValueError, match="stage 'label'"):
    TierModelHandler(config, "label")
  with pytest.raises(ValueError, match="tier must be"):
    TierModelHandler(config, "classify", tier="medium")


def test_the_guide_example_runs_as_written():
  import pathlib
  import re
  text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "library.md").read_text()
  section = text.split("## One tier inside Beam's RunInference", 1)[1].split("\n## ", 1)[0]
  [code] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  exec(compile(code, "docs/library.md", "exec"), {})  # noqa: S102 - the documented example
