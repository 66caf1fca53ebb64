"""Runs a long command (a build) and never goes quiet: a line at least every N seconds.

    python -m tierflow_local.heartbeat [--every 30] [--show REGEX] [--label TEXT] -- CMD ...

Lines of the command's output that match ``--show`` are printed as they come (a build's
"[ 45%] Building ..." steps); the rest are kept back, the last of them quoted by the
heartbeat. When nothing was printed for ``--every`` seconds it says how long the command
has run and what it last said. The exit code is the command's; when it fails, the last 40
lines of its output are printed whether they matched or not.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence


def _minutes(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  return f"{m} min {s:02d} s" if m else f"{s} s"


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="heartbeat", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--every", type=float, default=30.0)
  parser.add_argument("--show", default=r".", help="print output lines matching this")
  parser.add_argument("--label", default="", help="what the command does, for the heartbeat")
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command after --")
  show = re.compile(args.show)
  started = time.monotonic()
  last_printed = [started]
  tail: collections.deque = collections.deque(maxlen=40)
  lock = threading.Lock()
  label = f"{args.label}: " if args.label else ""

  def say(text: str) -> None:
    with lock:
      print(text, flush=True)
      last_printed[0] = time.monotonic()

  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", bufsize=1)
  done = threading.Event()

  def beat() -> None:
    while not done.wait(min(1.0, args.every / 4)):
      if time.monotonic() - last_printed[0] >= args.every:
        quoted = tail[-1][:120] if tail else "(no output yet)"
        say(f"... {label}still running after {_minutes(time.monotonic() - started)}; "
            f"last: {quoted}")

  threading.Thread(target=beat, daemon=True).start()
  for raw in proc.stdout:
    text = raw.rstrip("\n")
    if not text.strip():
      continue
    tail.append(text.strip())
    if show.search(text):
      say(text)
  code = proc.wait()
  done.set()
  if code != 0:
    say(f"{label}failed with exit code {code} after {_minutes(time.monotonic() - started)}; "
        "its last lines:")
    for text in tail:
      say(f"  {text}")
  else:
    say(f"{label}done in {_minutes(time.monotonic() - started)}")
  return code


if __name__ == "__main__":
  sys.exit(main())
