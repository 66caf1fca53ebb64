"""Self-consistency: several small-tier answers to one record, combined into one.

With ``samples: k`` on the small tier every pack is asked ``k`` times, at the model's
sampling temperature. The answer kept is the one the other valid samples agree with
most (the first of those on a tie); its confidence is the share of the ``k`` samples
agreeing with it (a failed sample agrees with nothing) times the mean own confidence
(logprob or verbalised) of the samples giving exactly that answer, or the share alone
when none has one. How two answers agree is the stage kind's: the same label, the share
of equal extraction fields, the word overlap of two summaries. Each sample is billed:
the record's usage and cost are the sum over its samples (``sample_usage`` keeps the
kept answer's own, which estimates what the record would cost on the frontier alone).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from tierflow.pipelines.ledger import TierOutcome
from tierflow.pipelines.stage_kinds import StageKind
from tierflow.prices import Usage

__all__ = ["combine"]


def combine(kind: StageKind, samples: Sequence[TierOutcome]) -> TierOutcome:
  """One outcome from ``samples`` (one record, one stage, one tier)."""
  if len(samples) == 1:
    return samples[0]
  k = len(samples)
  usage = sum((s.usage for s in samples), Usage())
  cost = sum(s.cost_usd for s in samples)
  valid = [s for s in samples if s.ok]
  if not valid:
    first = samples[0]
    return dataclasses.replace(first, usage=usage, cost_usd=cost,
                               sample_usage=first.usage,
                               notes=(f"all {k} samples failed", *first.notes))
  support = [sum(kind.agreement(s.value, o.value) for o in valid if o is not s)
             for s in valid]
  best = max(range(len(valid)), key=support.__getitem__)  # the first on a tie
  kept = valid[best]
  share = (1.0 + support[best]) / k
  same = [o for o in valid if kind.agreement(kept.value, o.value) == 1.0]
  own = [o.confidence for o in same if o.confidence is not None]
  value, confidence = kind.consistent(kept.value, sum(own) / len(own) if own else 1.0, share,
                                      [o.value for o in valid], k)
  said = f"{len(same)} of {k} samples give this answer"
  if len(valid) < k:
    said += f", {k - len(valid)} failed"
  return dataclasses.replace(kept, value=value, confidence=confidence, signal="agreement",
                             notes=(said, *kept.notes), usage=usage, cost_usd=cost,
                             sample_usage=kept.usage)
