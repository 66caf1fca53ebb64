"""The preflight's endpoint check (``llm_clients.check_endpoint``): the providers' unbilled
models list, as their APIs document it, with no SDK imported; a refused key or an endpoint
that cannot be reached is a one-line error naming neither the key nor a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tierflow.config import ModelConfig
from tierflow.connectors.llm_clients import ModelCallError, check_endpoint
from tierflow_local.provider_server import LocalProviderServer
from tierflow_local.broker import free_port

OPENAI_KEY, ANTHROPIC_KEY, WRONG = "sk-oa-SECRET-1111", "sk-ant-SECRET-2222", "sk-WRONG-3333"


def model(provider: str, base_url, key_env: str = "TF_TEST_KEY") -> ModelConfig:
  return ModelConfig(provider=provider, model="claude-sonnet-4-6" if provider == "anthropic"
                     else "gpt-4.1-nano", base_url=base_url, api_key_env=key_env)


@pytest.fixture
def keyed():
  with LocalProviderServer(openai_api_key=OPENAI_KEY, anthropic_api_key=ANTHROPIC_KEY) as srv:
    yield srv


def test_right_keys_pass_and_wrong_ones_are_refused_in_one_line(keyed, monkeypatch):
  for provider, base, key in (("openai", keyed.openai_base_url, OPENAI_KEY),
                              ("anthropic", keyed.anthropic_base_url, ANTHROPIC_KEY)):
    monkeypatch.setenv("TF_TEST_KEY", key)
    check_endpoint(model(provider, base))
    monkeypatch.setenv("TF_TEST_KEY", WRONG)
    with pytest.raises(ModelCallError) as e:
      check_endpoint(model(provider, base))
    assert e.value.kind == "auth" and str(e.value).startswith("auth: HTTP 401"), str(e.value)
    assert "\n" not in str(e.value) and WRONG not in str(e.value) and key not in str(e.value)
  statuses = [(r["path"], r["status"]) for r in keyed.stats()["requests"]]
  assert statuses == [("/v1/models", 200), ("/v1/models", 401)] * 2, statuses


def test_an_endpoint_that_cannot_be_reached_is_a_connection_error():
  dead = f"http://127.0.0.1:{free_port()}"
  for provider, base in (("openai", dead + "/v1"), ("anthropic", dead)):
    with pytest.raises(ModelCallError, match=r"^connection: cannot reach http://127\.0\.0\.1"):
      check_endpoint(model(provider, base, key_env=None))


def test_without_a_base_url_the_sdks_variable_is_used(keyed, monkeypatch):
  monkeypatch.setenv("TF_TEST_KEY", ANTHROPIC_KEY)
  monkeypatch.setenv("ANTHROPIC_BASE_URL", keyed.anthropic_base_url)
  check_endpoint(model("anthropic", None))
  monkeypatch.setenv("TF_TEST_KEY", OPENAI_KEY)
  monkeypatch.setenv("OPENAI_BASE_URL", keyed.openai_base_url)
  check_endpoint(model("openai", None))
  assert [r["status"] for r in keyed.stats()["requests"]] == [200, 200]


def test_the_check_imports_no_sdk(keyed):
  script = textwrap.dedent(f"""
      import json, os, sys
      os.environ["TF_TEST_KEY"] = {ANTHROPIC_KEY!r}
      from tierflow.config import ModelConfig
      from tierflow.connectors.llm_clients import check_endpoint
      check_endpoint(ModelConfig(provider="anthropic", model="claude-sonnet-4-6",
                                 base_url={keyed.anthropic_base_url!r}, api_key_env="TF_TEST_KEY"))
      print(json.dumps(sorted(m for m in ("anthropic", "openai") if m in sys.modules)))
      """)
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=60)
  assert done.returncode == 0, done.stderr[-2000:]
  assert json.loads(done.stdout.strip().splitlines()[-1]) == []
