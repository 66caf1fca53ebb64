"""Drawing a report (``tierflow.report.build_report``'s dict): PNG charts and one
self-contained HTML page, written next to ``report.json``."""

from __future__ import annotations

import base64
import html
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from tierflow.report import CHARTS, REASON_CLASSES, _per_1k

__all__ = ["render_html", "write_charts", "write_outputs"]


_COLORS = {"small": "#4C9F70", "frontier": "#3A6EA5", "frontier_only": "#B0B7C3",
           "low_confidence": "#3A6EA5", "no_confidence_signal": "#7FA7D1",
           "small_failure": "#D1603D", "small_skipped": "#C8CDD6", "other": "#9B7EBD",
           "budget_skipped": "#E8B04A",
           "curve": "#3A6EA5", "hull": "#3A6EA5", "routed": "#D1603D", "oracle": "#2E8B57"}
_REASON_LABELS = {"low_confidence": "low confidence",
                  "no_confidence_signal": "no confidence signal",
                  "small_failure": "small tier failed",
                  "small_skipped": "not certified: small tier not asked", "other": "other",
                  "budget_skipped": "wanted, skipped by budget cap"}


def _title_suffix(report: dict) -> str:
  """The tiers as their endpoints answered (model and host; a local endpoint says so)."""
  from tierflow.report import tier_name
  models = report["run"]["models"]
  small = ", ".join(tier_name(t) for t in models.get("small_tiers") or []) or \
      ", ".join(models["small"]) or "?"
  frontier = ", ".join(tier_name(t) for t in models.get("frontier_tiers") or []) or \
      ", ".join(models["frontier"]) or "none called"
  books = ", ".join(report["run"]["price_book_versions"]) or "?"
  return f"small: {small}  →  frontier: {frontier}   ·   price book {books}"


def _suptitle(fig, text: str) -> None:
  """A figure title wrapped to the figure's width (long model names must not be cut off)."""
  import textwrap
  width = max(30, int(fig.get_figwidth() * 12))
  lines = [w for line in text.split("\n") for w in textwrap.wrap(line, width) or [""]]
  fig.suptitle("\n".join(lines), fontsize=10.5)


def _figure(width: float, height: float):
  try:
    from matplotlib.figure import Figure
  except ImportError:
    raise ValueError("report charts need matplotlib: pip install 'tierflow[report]'") from None
  fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
  return fig


def _style(ax) -> None:
  ax.grid(True, color="#E3E6EA", linewidth=0.8)
  ax.set_axisbelow(True)
  for side in ("top", "right"):
    ax.spines[side].set_visible(False)


def _plot_quality_curve(ax, stage: dict) -> None:
  curve = stage["threshold_curve"]
  pts = curve["points"]
  x = [p["cost_per_1k"] for p in pts]
  y = [100 * p["accuracy"] for p in pts]
  hull = curve["hull"] or []
  ymin = min(y + [100 * (stage["quality"]["small_only_accuracy"] or 0)]) - 2
  if hull:
    hx = [h["cost_per_1k"] for h in hull]
    hy = [100 * h["accuracy"] for h in hull]
    ax.fill_between(hx, hy, ymin, color=_COLORS["hull"], alpha=0.12,
                    label=f"non-decreasing hull (AIQ {curve['aiq']:.3f})")
    ax.plot(hx, hy, color=_COLORS["hull"], linewidth=1, alpha=0.5)
  est, swept = curve.get("estimated_thresholds"), curve.get("thresholds_swept")
  sweep = ("threshold sweep (measured)" if not est else
           f"threshold sweep (estimated at {est} of {swept} thresholds)")
  ax.plot(x, y, color=_COLORS["curve"], linewidth=1.6, marker=".", markersize=3, label=sweep)
  flagged = [(a, b) for a, b, p in zip(x, y, pts) if p.get("estimated")]
  if flagged:
    ax.scatter(*zip(*flagged), marker="o", s=14, facecolors="white", zorder=4,
               edgecolors=_COLORS["curve"], linewidths=0.8, label="estimated point")
  marks = [
      (curve.get("chosen_point"), "D", "#1F3B5C", "chosen threshold {t}", "accuracy"),
      (curve.get("routed_point"), "*", _COLORS["routed"], "routed (this run)", "accuracy"),
      (stage.get("small_only_point"), "o", _COLORS["small"], "small only", "accuracy"),
      (stage.get("frontier_only_point"), "s", _COLORS["frontier"], "frontier only (measured)",
       "accuracy"),
      (stage["oracle"] and {"cost_per_1k": stage["oracle"]["cost_per_1k"],
                            "accuracy": stage["oracle"]["accuracy"]},
       "^", _COLORS["oracle"], "oracle cascade", "accuracy"),
  ]
  for point, marker, color, label, key in marks:
    if not point or point.get(key) is None or point.get("cost_per_1k") is None:
      continue
    label = label.format(t=f"{curve['chosen_threshold']:.2f}" if curve["chosen_threshold"]
                         is not None else "?")
    hollow = marker == "s"
    ax.scatter([point["cost_per_1k"]], [100 * point[key]], marker=marker,
               s=150 if marker == "*" else 60, zorder=5, label=label,
               facecolors="white" if hollow else color, edgecolors=color, linewidths=1.5)
  ax.set_ylim(bottom=ymin)
  ax.set_xlabel("cost, USD per 1k records (this stage)")
  ax.set_ylabel("accuracy, %")
  ax.legend(fontsize=7.5, loc="lower right", framealpha=0.9)


def _plot_cost_curve(ax, stage: dict, source: str) -> None:
  curve = stage["threshold_curve"]
  pts = curve["points"]
  ax.plot([p["threshold"] for p in pts], [p["cost_per_1k"] for p in pts],
          color=_COLORS["curve"], linewidth=1.6, drawstyle="steps-post",
          label="cost if escalating confidence < t")
  only = stage["cost"]["frontier_only_per_1k"]
  if only is not None:
    ax.axhline(only, color=_COLORS["frontier_only"], linestyle="--",
               label=f"frontier only ({source})")
  ax.axhline(stage["cost"]["small_tier_per_1k"] or 0, color=_COLORS["small"], linestyle=":",
             label="small only")
  routed = stage["cost"]["routed_per_1k"]
  if routed is not None and curve["chosen_threshold"] is not None:
    ax.scatter([curve["chosen_threshold"]], [routed], marker="*", s=150, zorder=6,
               color=_COLORS["routed"], label="routed (this run)")
  cp = curve.get("chosen_point")
  if cp:
    ax.scatter([cp["threshold"]], [cp["cost_per_1k"]], marker="D", color="#1F3B5C", zorder=5,
               label=f"chosen threshold {cp['threshold']:.2f} "
                     f"({100 * (cp['escalated'] / max(curve['records'], 1)):.0f}% escalated)")
  ax.set_xlim(0, 1.02)
  ax.set_xlabel("threshold on the small tier's confidence")
  ax.set_ylabel("cost, USD per 1k records (this stage)")
  ax.legend(fontsize=7.5, loc="lower right", framealpha=0.9)


def _chart_cost_quality(report: dict, path: str) -> None:
  stages = list(report["stages"].items())
  with_q = [(n, s) for n, s in stages if s["threshold_curve"]["points"]
            and "accuracy" in s["threshold_curve"]["points"][0]]
  shown = with_q or [(n, s) for n, s in stages if s["threshold_curve"]["points"]]
  cols = max(1, min(3, len(shown)))
  rows = max(1, math.ceil(len(shown) / cols))
  fig = _figure(5.2 * cols, 4.2 * rows + 0.6)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax, (name, stage) in zip(axes, shown):
    _style(ax)
    if with_q:
      _plot_quality_curve(ax, stage)
    else:
      _plot_cost_curve(ax, stage, report["cost"].get("frontier_only_source", "estimate"))
    kind = "" if stage["kind"] == name else f" ({stage['kind']})"
    ax.set_title(f"{name}{kind}: {stage['small_model'] or '?'} → "
                 f"{stage['frontier_model'] or '—'}", fontsize=9.5)
  for ax in axes[len(shown):]:
    ax.set_visible(False)
  head = ("Cost vs quality over escalation thresholds" if with_q else
          "Cost over escalation thresholds (no labels: quality not computed)")
  _suptitle(fig, f"{head}\n{_title_suffix(report)}")
  fig.savefig(path)


def _chart_escalation(report: dict, path: str) -> None:
  names = list(report["stages"])
  fig = _figure(max(7.0, 1.6 * len(names) + 4.5), 4.4)
  ax = fig.subplots()
  _style(ax)
  bottom = np.zeros(len(names))
  for cls in (*REASON_CLASSES, "budget_skipped"):
    vals = np.array([100 * (report["stages"][n]["escalation"]["by_reason_rate"][cls] or 0)
                     for n in names])
    if not vals.any():
      continue
    ax.bar(names, vals, bottom=bottom, color=_COLORS[cls], label=_REASON_LABELS[cls],
           width=0.6, hatch="//" if cls == "budget_skipped" else None,
           edgecolor="white", linewidth=0.6)
    bottom += vals
  for i, n in enumerate(names):
    esc = report["stages"][n]["escalation"]
    ax.annotate(f"{100 * (esc['escalation_rate'] or 0):.1f}% sent\n({esc['escalated']}/"
                f"{esc['records']})", (i, bottom[i]), ha="center", va="bottom", fontsize=8,
                xytext=(0, 3), textcoords="offset points")
  ax.set_ylim(0, max(5.0, float(bottom.max()) * 1.25))
  ax.set_ylabel("% of records")
  ax.set_xlabel("stage")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              title="escalation reason", title_fontsize=8, frameon=False)
  _suptitle(fig, f"Escalations to the frontier tier by stage and reason\n{_title_suffix(report)}")
  fig.savefig(path)


def _chart_cost(report: dict, path: str) -> None:
  groups = [(n, s["cost"]) for n, s in report["stages"].items()]
  total = report["cost"]
  groups.append(("all stages", {
      "small_tier_per_1k": _per_1k(total["small_tier_usd"], report["run"]["records"]),
      "frontier_tier_per_1k": _per_1k(total["frontier_tier_usd"], report["run"]["records"]),
      "frontier_only_per_1k": total["frontier_only_per_1k"],
      "savings_pct": total["savings_pct"]}))
  x = np.arange(len(groups))
  w = 0.36
  fig = _figure(max(6.0, 1.9 * len(groups) + 2.5), 4.6)
  ax = fig.subplots()
  _style(ax)
  small = np.array([g["small_tier_per_1k"] or 0 for _, g in groups])
  front = np.array([g["frontier_tier_per_1k"] or 0 for _, g in groups])
  only = np.array([g["frontier_only_per_1k"] or 0 for _, g in groups])
  ax.bar(x - w / 2, small, w, color=_COLORS["small"], label="routed: small tier")
  ax.bar(x - w / 2, front, w, bottom=small, color=_COLORS["frontier"],
         label="routed: frontier tier")
  source = report["cost"].get("frontier_only_source", "estimate")
  ax.bar(x + w / 2, only, w, color=_COLORS["frontier_only"], label=f"frontier only ({source})")
  unknown = not report.get("quality")
  top = float(max((small + front).max(), only.max(), 1e-12))
  for i, (_, g) in enumerate(groups):
    if g.get("savings_pct") is not None:
      ax.annotate(f"saves {g['savings_pct']:.0f}%" + ("\nquality unknown" if unknown else ""),
                  (x[i], max(small[i] + front[i], only[i])),
                  ha="center", va="bottom", fontsize=8, xytext=(0, 3),
                  textcoords="offset points")
  ax.set_xticks(x, [n for n, _ in groups])
  ax.set_ylim(0, top * 1.2)
  ax.set_ylabel("USD per 1k records")
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
  _suptitle(fig, f"Cost by stage and tier vs frontier only\n{_title_suffix(report)}")
  fig.savefig(path)


def write_charts(report: dict, out_dir: str) -> dict[str, str]:
  """The three PNGs; returns name -> path."""
  paths = {name: os.path.join(out_dir, name) for name in CHARTS}
  _chart_cost_quality(report, paths["cost_quality.png"])
  _chart_escalation(report, paths["escalation_by_stage.png"])
  _chart_cost(report, paths["cost_breakdown.png"])
  return paths


def write_outputs(report: dict, out_dir: str, *, charts: bool = True) -> dict[str, str]:
  """Writes report.json, the PNGs and a self-contained report.html into out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  paths = write_charts(report, out_dir) if charts else {}
  data = _jsonable(report)
  paths["report.json"] = os.path.join(out_dir, "report.json")
  with open(paths["report.json"], "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, allow_nan=False)
    f.write("\n")
  paths["report.html"] = os.path.join(out_dir, "report.html")
  with open(paths["report.html"], "w", encoding="utf-8") as f:
    f.write(render_html(data, {k: v for k, v in paths.items() if k.endswith(".png")}))
  return paths


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.bool_):
    return bool(value)
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, (float, np.floating)):
    v = float(value)
    return v if math.isfinite(v) else None
  return value


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#1d2733;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;
border-bottom:1px solid #e3e6ea;padding-bottom:.3rem}.sub{color:#5b6673}
.cards{display:flex;flex-wrap:wrap;gap:.8rem;margin:1rem 0}.card{border:1px solid #e3e6ea;
border-radius:8px;padding:.6rem .9rem;min-width:150px}.card b{display:block;font-size:1.3rem}
.card span{color:#5b6673;font-size:.8rem}table{border-collapse:collapse;margin:.5rem 0;
font-size:13px}th,td{padding:.3rem .7rem;border-bottom:1px solid #eef0f2;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f6f7f9}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eef0f2}
figcaption{color:#5b6673;font-size:.85rem}li{margin:.2rem 0}.est{color:#a05a00}
.guarantee{background:#eef4fb;border:1px solid #3a6ea5;color:#14365c;padding:.6rem .8rem;
margin:.8rem 0;border-radius:4px}.guarantee p{margin:.2rem 0}
.card.savings{max-width:360px}
.banner{background:#fdecea;border:1px solid #d93025;color:#7a1c14;padding:.6rem .8rem;margin:.5rem 0;border-radius:4px;font-weight:600}
"""


def _fmt(value: Any, kind: str = "num") -> str:
  if value is None:
    return "—"
  if kind == "usd":
    return f"${value:,.4f}" if abs(value) < 100 else f"${value:,.2f}"
  if kind == "pct":
    return f"{value:.1f}%"
  if kind == "rate":
    return f"{100 * value:.1f}%"
  if isinstance(value, float):
    return f"{value:.4g}"
  return html.escape(str(value))


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
  body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _ci(report: dict, key: str, kind: str) -> str:
  ci = report["bootstrap"]["intervals"].get(key)
  if not ci:
    return ""
  return f" <small>[{_fmt(ci['lo'], kind)}, {_fmt(ci['hi'], kind)}]</small>"


def _cards(report: dict) -> str:
  c, r = report["cost"], report["run"]
  items = [
      ("routed cost / 1k records", _fmt(c["routed_per_1k"], "usd") +
       _ci(report, "routed_cost_per_1k", "usd")),
      ((f"frontier only / 1k ({c.get('frontier_only_source', 'measured')}: "
        f"{c['frontier_only_measured_records']} records)",
        _fmt(c["frontier_only_measured_per_1k"], "usd"))
       if c.get("frontier_only_measured_per_1k") is not None else
       ("frontier only / 1k (estimated from the ledger)",
        _fmt(c["frontier_only_per_1k"], "usd"))),
      ("small only / 1k", _fmt(c["small_only_per_1k"], "usd")),
      ("savings vs frontier only; " + c.get("savings_quality", ""),
       _fmt(c["savings_pct"], "pct") + _ci(report, "savings_pct", "pct")),
      ("records escalated", _fmt(r["escalation_rate"], "rate")),
      ("records failed", f"{r['failed']} / {r['records']}"),
  ]
  if report["quality"]:
    items.append(("routed accuracy", _fmt(report["quality"]["routed_accuracy"], "rate") +
                  _ci(report, "routed_accuracy", "rate")))
  return '<div class="cards">' + "".join(
      f'<div class="card"><b>{v}</b><span>{html.escape(k)}</span></div>' for k, v in items
  ) + "</div>"


def _stage_quality_word(stage: dict) -> str:
  """A stage's quality beside its saving: measured, or "unknown"."""
  q = stage["quality"]
  if not q or q["routed_accuracy"] is None:
    return "unknown"
  fo = q.get("frontier_only_accuracy")
  return (f"{_fmt(q['routed_accuracy'], 'rate')} vs {_fmt(fo, 'rate')} (measured)"
          if fo is not None else f"{_fmt(q['routed_accuracy'], 'rate')}; frontier only unknown")


def _guarantee_box(report: dict) -> str:
  lines = "".join(f"<p>{html.escape(g)}</p>" for g in report.get("guarantee") or [])
  return f'<div class="guarantee"><b>What is guaranteed</b>{lines}</div>' if lines else ""


def _stage_tables(report: dict) -> str:
  stages = report["stages"]
  cost = _table(
      ["stage", "records", "small tier", "frontier tier", "routed", "frontier only",
       "saved", "quality", "routed / 1k", "frontier only / 1k"],
      [[html.escape(n), str(s["escalation"]["records"]), _fmt(s["cost"]["small_tier_usd"], "usd"),
        _fmt(s["cost"]["frontier_tier_usd"], "usd"), _fmt(s["cost"]["routed_usd"], "usd"),
        _fmt(s["cost"]["frontier_only_usd"], "usd"), _fmt(s["cost"]["savings_pct"], "pct"),
        _stage_quality_word(s),
        _fmt(s["cost"]["routed_per_1k"], "usd"), _fmt(s["cost"]["frontier_only_per_1k"], "usd")]
       for n, s in stages.items()])
  esc = _table(
      ["stage", "confidence", "threshold", "sent to frontier", "low confidence", "no signal",
       "small failed", "small not asked", "budget skipped", "frontier failed",
       "answer missing"],
      [[html.escape(n), html.escape(", ".join(s.get("signals") or []) or "none"),
        _fmt(s["threshold"]), _fmt(s["escalation"]["escalation_rate"], "rate"),
        *(str(s["escalation"]["by_reason"][k]) for k in
          ("low_confidence", "no_confidence_signal", "small_failure", "small_skipped",
           "budget_skipped")),
        str(s["escalation"]["frontier_failed"]), str(s["failed"])]
       for n, s in stages.items()])
  return f"<h2>Cost by stage and tier</h2>{cost}<h2>Escalations by stage</h2>{esc}"


def _quality_tables(report: dict) -> str:
  rows, oracle_rows = [], []
  for n, s in report["stages"].items():
    q = s["quality"]
    if not q:
      continue
    curve = s["threshold_curve"]
    rows.append([html.escape(n), str(q["labelled_records"]),
                 _fmt(q["routed_accuracy"], "rate") + _ci(report, f"stages.{n}.routed_accuracy",
                                                          "rate"),
                 _fmt(q["small_only_accuracy"], "rate"),
                 (_fmt(q["frontier_only_accuracy"], "rate") + " (measured)"
                  if q.get("frontier_only_accuracy") is not None else "unknown"),
                 f'{_fmt(q["escalated_record_frontier_accuracy"], "rate")}'
                 f' (n={q["escalated_records_with_frontier_answer"]})',
                 _fmt(q["error_non_escalated"], "rate") +
                 _ci(report, f"stages.{n}.error_non_escalated", "rate"),
                 _fmt(q["coverage"], "rate"), _fmt(curve["aiq"])])
    o = s["oracle"]
    if o:
      oracle_rows.append([html.escape(n), _fmt(o["accuracy"], "rate"),
                          _fmt(o["cost_per_1k"], "usd"), _fmt(o["escalation_rate"], "rate"),
                          str(o["frontier_assumed_correct"]),
                          _fmt(o["escalate_all_small_wrong_cost_per_1k"], "usd")])
  if not rows:
    return ""
  out = "<h2>Quality (labelled records)</h2>" + _table(
      ["stage", "labelled", "routed accuracy [95% CI]", "small only", "frontier only",
       "frontier on the escalated records",
       "error on non-escalated [95% CI]", "coverage", "AIQ"], rows)
  if oracle_rows:
    out += "<h2>Oracle cascade</h2>" + _table(
        ["stage", "accuracy", "cost / 1k labelled", "escalated", "frontier assumed right",
         "cost / 1k escalating every small error"], oracle_rows)
  return out


def render_html(report: dict, images: Mapping[str, str]) -> str:
  """One self-contained page; charts embedded as base64 (and named, files beside it)."""
  r = report["run"]
  figs = []
  captions = {"cost_quality.png": "Cost vs quality over thresholds (hull shaded; AIQ in legend)",
              "escalation_by_stage.png": "Escalations by stage and reason",
              "cost_breakdown.png": "Cost by stage and tier vs frontier only"}
  for name, path in images.items():
    with open(path, "rb") as f:
      data = base64.b64encode(f.read()).decode("ascii")
    figs.append(f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
                f'<figcaption>{html.escape(captions.get(name, name))} '
                f'(<a href="{name}">{name}</a>)</figcaption></figure>')
  notes = "".join(f"<li>{html.escape(n)}</li>" for n in report["notes"])
  banners = "".join(f'<div class="banner">{html.escape(b)}</div>'
                    for b in report.get("banners") or [])
  cal = report.get("calibration")
  cal_line = ""
  if cal:
    g = lambda v: "?" if v is None else f"{v:.3g}"  # noqa: E731
    cal_line = "<br>calibration " + html.escape("; ".join(
        f"{n}: alpha {g(c['alpha'])}, delta {g(c['delta'])}, n {c['n']}, "
        f"{'certified' if c['certified'] else 'NOT certified'}, threshold {g(c['threshold'])}"
        for n, c in cal["stages"].items()))
  mode = ("cost and quality" if report["mode"] == "cost_and_quality"
          else "cost only (no labels)")
  return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tierflow report</title>
<style>{_CSS}</style></head><body>
<h1>tierflow run report</h1>
<div class="sub">{html.escape(_title_suffix(report))}<br>
{r['records']} records · dt {_fmt(r['dt_min'])} … {_fmt(r['dt_max'])} ·
calibration {html.escape(', '.join(r['calibration_versions']) or 'none')} · {mode} ·
generated {html.escape(report['generated_at'])}{cal_line}</div>
{banners}
{_guarantee_box(report)}
{_cards(report)}
{''.join(figs)}
{_stage_tables(report)}
{_quality_tables(report)}
<h2>Notes and assumptions</h2><ul>{notes}</ul>
<p class="sub">Bootstrap: {report['bootstrap']['resamples']} resamples of records,
seed {report['bootstrap']['seed']}, {report['bootstrap']['method']}. All numbers are in
report.json.</p>
</body></html>
"""


# ----------------------------------------------------------------------------- CLI
