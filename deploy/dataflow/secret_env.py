"""Optional container entrypoint: Secret Manager secrets -> env vars -> exec boot.

Usage (Dockerfile)::

    ENV TIERFLOW_SECRET_ENV="ANTHROPIC_API_KEY=projects/P/secrets/anthropic-api-key/versions/latest,\
    OPENAI_API_KEY=projects/P/secrets/openai-api-key/versions/3"
    ENTRYPOINT ["python", "/opt/tierflow/secret_env.py", "/opt/apache/beam/boot"]

For each ``NAME=projects/.../secrets/.../versions/...`` pair it reads the
secret with the worker's service account (which needs
``roles/secretmanager.secretAccessor`` on those secrets only), sets ``NAME``
in the environment and then replaces itself with the given command (Beam's
``boot``), which Dataflow requires to be the last step of container start-up.
The image holds secret *names* only; values never appear in the image, the
job's pipeline options or the Dataflow UI. With ``TIERFLOW_SECRET_ENV`` empty
it just execs the command.

Not run on Dataflow here (no GCP access); ``tests/test_deploy_files.py`` checks
the parsing and the exec hand-off with a fake client.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, Mapping, Sequence

SPEC_VAR = "TIERFLOW_SECRET_ENV"
_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_VERSION = re.compile(r"^projects/[^/]+/secrets/[^/]+/versions/[^/]+$")


def parse_spec(spec: str) -> dict[str, str]:
  """``"A=projects/p/secrets/s/versions/latest,B=..."`` -> {env name: secret version}."""
  out: dict[str, str] = {}
  for item in (spec or "").split(","):
    item = item.strip()
    if not item:
      continue
    name, sep, version = item.partition("=")
    name, version = name.strip(), version.strip()
    if not sep or not _NAME.match(name):
      raise ValueError(f"{SPEC_VAR}: {item!r} is not NAME=projects/.../secrets/.../versions/...")
    if not _VERSION.match(version):
      raise ValueError(f"{SPEC_VAR}: {version!r} is not a secret version resource name")
    out[name] = version
  return out


def _secret_manager_access() -> Callable[[str], str]:
  from google.cloud import secretmanager  # installed with apache-beam[gcp]
  client = secretmanager.SecretManagerServiceClient()

  def access(version: str) -> str:
    return client.access_secret_version(name=version).payload.data.decode("utf-8")

  return access


def resolve(spec: str, access: Callable[[str], str] | None = None) -> dict[str, str]:
  wanted = parse_spec(spec)
  if not wanted:
    return {}
  access = access or _secret_manager_access()
  return {name: access(version) for name, version in wanted.items()}


def main(argv: Sequence[str], environ: Mapping[str, str] = os.environ,
         execve: Callable = os.execve, access: Callable[[str], str] | None = None) -> None:
  if not argv:
    raise SystemExit("usage: secret_env.py COMMAND [ARGS...]")
  env = dict(environ)
  env.update(resolve(env.get(SPEC_VAR, ""), access))
  execve(argv[0], list(argv), env)


if __name__ == "__main__":
  main(sys.argv[1:])
