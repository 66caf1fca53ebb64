"""Packed requests ask for enough output tokens: short label sets must not truncate."""

import pytest

from tierflow.config import ModelConfig, StageConfig
from tierflow.connectors.llm_clients import ModelClient
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.standin_model import KeywordStandIn
from tierflow.pipelines.prompts import build_prompt, parse_reply


@pytest.mark.parametrize("labels", [("great", "other"), ("a", "b", "c"),
                                    ("billing", "product_defect")])
@pytest.mark.parametrize("packed", [1, 8, 24])
def test_packed_classify_answers_fit_the_output_allowance(labels, packed):
  stage = StageConfig(name="classify", kind="classify", labels=labels)
  texts = [f"record {i}: other great thing {'a b c ' * (i % 3)}" for i in range(packed)]
  with LocalProviderServer(KeywordStandIn(), models=("small",)) as server:
    client = ModelClient(ModelConfig(provider="openai", model="small",
                                     base_url=server.openai_base_url, logprobs=True))
    system, user = build_prompt(stage, texts)
    reply = client.complete(system, user, stage.output_tokens_per_record() * packed + 16)
  answers = parse_reply(stage, reply, texts)
  assert not reply.truncated
  assert [a.error for a in answers] == [None] * packed
  assert all(a.value in labels for a in answers)
