"""Tests for tierflow.report: every number checked against independent DuckDB SQL."""

import base64
import json
import os

import duckdb
import numpy as np
import pytest

import report_fixtures
from tierflow import report, report_command, report_render

REL = 1e-9
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def approx(x):
  return pytest.approx(x, rel=REL, abs=1e-12)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("run"))
  info = report_fixtures.write_run(root)
  out = os.path.join(root, "report")
  rep = report.build_report(root, info["labels"], out_dir=out)
  with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
    data = json.load(f, parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
  return {**info, "out": out, "report": rep, "json": data}


@pytest.fixture(scope="module")
def sql(run):
  con = duckdb.connect()
  glob = f"{run['root']}/results/**/*.parquet"
  con.execute(f"CREATE VIEW raw AS SELECT * FROM read_parquet('{glob}', "
              "hive_partitioning=true, hive_types={'dt': VARCHAR})")
  con.execute("CREATE VIEW r AS SELECT DISTINCT ON (record_id) * FROM raw ORDER BY record_id")
  con.execute("CREATE VIEW s AS SELECT record_id, ticket_id, label, extraction, "
              "UNNEST(stages) AS st FROM r")
  con.execute(f"CREATE VIEW l AS SELECT * FROM read_json('{run['labels']}', "
              "format='newline_delimited')")
  # Correctness of the final, small and (observed) frontier answers, per labelled stage.
  con.execute("""
    CREATE VIEW scored AS
    SELECT st.stage AS stage, st.escalation_reason AS reason, st.escalated AS escalated,
           st.final_tier AS final_tier, st.small_cost_usd AS small_cost,
           st.frontier_only_cost_usd AS fo_cost,
           CASE st.stage
             WHEN 'classify' THEN coalesce(lower(trim(label)) = l.category, false)
             ELSE coalesce(extraction IS NOT NULL
               AND json_extract_string(extraction, '$.order_id') IS NOT DISTINCT FROM l.order_id
               AND TRY_CAST(json_extract_string(extraction, '$.amount') AS DOUBLE)
                   IS NOT DISTINCT FROM l.amount
               AND json_extract_string(extraction, '$.currency') IS NOT DISTINCT FROM l.currency,
               false) END AS final_ok,
           CASE st.stage
             WHEN 'classify' THEN coalesce(lower(trim(st.small_answer)) = l.category, false)
             ELSE coalesce(st.small_answer IS NOT NULL
               AND json_extract_string(st.small_answer, '$.order_id')
                   IS NOT DISTINCT FROM l.order_id
               AND TRY_CAST(json_extract_string(st.small_answer, '$.amount') AS DOUBLE)
                   IS NOT DISTINCT FROM l.amount
               AND json_extract_string(st.small_answer, '$.currency')
                   IS NOT DISTINCT FROM l.currency, false) END AS small_ok
    FROM s JOIN l USING (ticket_id) WHERE st.stage IN ('classify', 'extract')""")
  yield con
  con.close()


def one(con, query):
  row = con.execute(query).fetchone()
  return row if len(row) > 1 else row[0]


# ----------------------------------------------------------------------------- totals


def test_totals_match_sql(run, sql):
  j = run["json"]
  n, failed, esc, skipped, cost, small, frontier, fo = one(sql, """
    SELECT count(*), count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE escalated),
           count(*) FILTER (WHERE budget_skipped), sum(cost_usd), sum(small_cost_usd),
           sum(frontier_cost_usd), sum(frontier_only_cost_usd) FROM r""")
  assert j["run"]["records"] == n == 240
  assert j["run"]["failed"] == failed > 0
  assert j["run"]["escalated"] == esc
  assert j["run"]["escalation_rate"] == approx(esc / n)
  assert j["run"]["budget_skipped"] == skipped > 0
  c = j["cost"]
  assert c["routed_usd"] == approx(cost)
  assert c["routed_per_1k"] == approx(1000 * cost / n)
  assert c["small_only_usd"] == approx(small)
  assert c["small_only_per_1k"] == approx(1000 * small / n)
  assert c["frontier_tier_usd"] == approx(frontier)
  assert c["frontier_only_usd"] == approx(fo)
  assert c["frontier_only_per_1k"] == approx(1000 * fo / n)
  assert c["savings_usd"] == approx(fo - cost)
  assert c["savings_pct"] == approx(100 * (1 - cost / fo))
  assert j["run"]["price_book_versions"] == [report_fixtures.PRICE_BOOK]
  assert j["run"]["models"] == {
      "small": [report_fixtures.SMALL], "frontier": [report_fixtures.FRONTIER],
      "small_tiers": [{"model": report_fixtures.SMALL, "endpoint": "api.openai.com",
                       "local": False}],
      "frontier_tiers": [{"model": report_fixtures.FRONTIER, "endpoint": "api.anthropic.com",
                          "local": False}]}
  assert (j["run"]["dt_min"], j["run"]["dt_max"]) == ("2026-11-20", "2026-11-21")


def test_duplicates_counted_once(run, sql):
  rows, distinct = one(sql, "SELECT count(*), count(DISTINCT record_id) FROM raw")
  assert rows == 270 and distinct == 240  # records 120..149 are in two files
  j = run["json"]
  assert j["inputs"]["rows_read"] == rows
  assert j["inputs"]["duplicate_rows_dropped"] == rows - distinct
  assert j["run"]["records"] == distinct
  assert all(s["escalation"]["records"] == distinct for s in j["stages"].values())


def test_dead_letters_counted(run):
  dl = run["json"]["dead_letter"]
  failed = sum(r["status"] == "failed" for r in run["rows"])
  assert dl["rows"] == failed + 1
  assert dl["records_not_in_results"] == 1
  assert dl["by_error_type"] == {"model_error": failed, "invalid_utf8": 1}


# ----------------------------------------------------------------------------- stages


@pytest.mark.parametrize("stage", ["classify", "extract", "summarise"])
def test_stage_escalation_and_cost_match_sql(run, sql, stage):
  st = run["json"]["stages"][stage]
  (n, esc, requested, low, nosig, smallfail, skipped, ffail, small, frontier, cost, fo,
   missing) = one(sql, f"""
    SELECT count(*), count(*) FILTER (WHERE st.escalated),
           count(*) FILTER (WHERE st.escalation_reason IS NOT NULL),
           count(*) FILTER (WHERE st.escalated AND st.escalation_reason LIKE 'confidence %'),
           count(*) FILTER (WHERE st.escalated AND st.escalation_reason = 'no confidence signal'),
           count(*) FILTER (WHERE st.escalated AND st.escalation_reason LIKE 'small tier failed%'),
           count(*) FILTER (WHERE st.budget_skipped),
           count(*) FILTER (WHERE st.escalated AND st.frontier_error IS NOT NULL),
           sum(st.small_cost_usd), sum(st.frontier_cost_usd), sum(st.cost_usd),
           sum(st.frontier_only_cost_usd), count(*) FILTER (WHERE st.final_tier IS NULL)
    FROM s WHERE st.stage = '{stage}'""")
  e = st["escalation"]
  assert e["records"] == n
  assert e["escalated"] == esc and e["escalation_rate"] == approx(esc / n)
  assert e["requested"] == requested and e["requested_rate"] == approx(requested / n)
  assert e["by_reason"] == {"low_confidence": low, "no_confidence_signal": nosig,
                            "small_failure": smallfail, "small_skipped": 0, "other": 0,
                            "budget_skipped": skipped}
  assert low + nosig + smallfail == esc and esc + skipped == requested
  assert e["frontier_failed"] == ffail
  assert st["failed"] == missing
  c = st["cost"]
  assert c["small_tier_usd"] == approx(small)
  assert c["frontier_tier_usd"] == approx(frontier)
  assert c["routed_usd"] == approx(cost)
  assert c["frontier_only_usd"] == approx(fo)
  assert c["savings_pct"] == approx(100 * (1 - cost / fo))
  assert c["routed_per_1k"] == approx(1000 * cost / n)
  assert run["json"]["cost"]["by_stage"][stage] == st["cost"]


# ----------------------------------------------------------------------------- quality


@pytest.mark.parametrize("stage", ["classify", "extract"])
def test_quality_matches_sql(run, sql, stage):
  q = run["json"]["stages"][stage]["quality"]
  n, routed, small, frontier_n, frontier_acc, kept, kept_err = one(sql, f"""
    SELECT count(*), avg(final_ok::INT), avg(small_ok::INT),
           count(*) FILTER (WHERE final_tier = 'frontier'),
           avg(final_ok::INT) FILTER (WHERE final_tier = 'frontier'),
           count(*) FILTER (WHERE reason IS NULL),
           avg((NOT final_ok)::INT) FILTER (WHERE reason IS NULL)
    FROM scored WHERE stage = '{stage}'""")
  assert q["labelled_records"] == n == 237  # three tickets have no label
  assert q["routed_accuracy"] == approx(routed)
  assert q["small_only_accuracy"] == approx(small)
  assert q["escalated_records_with_frontier_answer"] == frontier_n
  assert q["escalated_record_frontier_accuracy"] == approx(frontier_acc)
  assert q["non_escalated_records"] == kept
  assert q["error_non_escalated"] == approx(kept_err)
  assert q["coverage"] == approx(kept / n)
  assert 0 < kept_err < 1 and small < routed


def test_run_quality_is_micro_average_over_stage_answers(run, sql):
  acc, n = one(sql, "SELECT avg(final_ok::INT), count(*) FROM scored")
  assert run["json"]["quality"]["routed_accuracy"] == approx(acc)
  assert run["json"]["quality"]["labelled_stage_answers"] == n
  assert run["json"]["inputs"]["label_fields"] == {
      "classify": ["category"], "extract": ["amount", "currency", "order_id"]}


@pytest.mark.parametrize("stage", ["classify", "extract"])
def test_oracle_matches_sql(run, sql, stage):
  o = run["json"]["stages"][stage]["oracle"]
  # Frontier answer known wrong: the stage's final answer came from the frontier and is wrong.
  n, cost, cost_all, acc, esc, assumed = one(sql, f"""
    WITH x AS (SELECT *, final_tier = 'frontier' AND NOT final_ok AS f_wrong,
                         NOT small_ok AND NOT (final_tier = 'frontier' AND NOT final_ok)
                           IS TRUE AS esc
               FROM scored WHERE stage = '{stage}')
    SELECT count(*), sum(small_cost) + coalesce(sum(fo_cost) FILTER (WHERE esc), 0),
           sum(small_cost) + coalesce(sum(fo_cost) FILTER (WHERE NOT small_ok), 0),
           (count(*) FILTER (WHERE small_ok) + count(*) FILTER (WHERE esc)) / count(*),
           count(*) FILTER (WHERE esc),
           count(*) FILTER (WHERE esc AND final_tier IS DISTINCT FROM 'frontier')
    FROM x""")
  assert o["records"] == n
  assert o["cost_usd"] == approx(cost)
  assert o["cost_per_1k"] == approx(1000 * cost / n)
  assert o["escalate_all_small_wrong_cost_usd"] == approx(cost_all)
  assert o["accuracy"] == approx(acc)
  assert o["escalated"] == esc
  assert o["frontier_assumed_correct"] == assumed > 0
  assert o["accuracy"] >= run["json"]["stages"][stage]["quality"]["routed_accuracy"]


def test_threshold_curve_chosen_point_matches_sql(run, sql):
  curve = run["json"]["stages"]["classify"]["threshold_curve"]
  n, esc, cost = one(sql, """
    SELECT count(*),
           count(*) FILTER (WHERE st.small_error IS NOT NULL OR st.confidence IS NULL
                            OR st.confidence < 0.6),
           sum(st.small_cost_usd) + sum(st.frontier_only_cost_usd) FILTER (
             WHERE st.small_error IS NOT NULL OR st.confidence IS NULL OR st.confidence < 0.6)
    FROM s JOIN l USING (ticket_id) WHERE st.stage = 'classify'""")
  cp = curve["chosen_point"]
  assert curve["records"] == n and curve["chosen_threshold"] == 0.6
  assert cp["escalated"] == esc
  assert cp["cost_per_1k"] == approx(1000 * cost / n)
  pts = curve["points"]
  assert pts[0]["threshold"] == 0.0 and pts[-1]["escalated"] == n
  costs = [p["cost_usd"] for p in pts]
  assert costs == sorted(costs)
  assert any(p["estimated"] for p in pts)
  hull = curve["hull"]
  acc = [h["accuracy"] for h in hull]
  assert acc == sorted(acc) and hull[-1]["cost_per_1k"] == approx(max(p["cost_per_1k"]
                                                                      for p in pts))
  assert 0 < curve["aiq"] <= max(acc)


def test_aiq_matches_routerbench_definition():
  # (1, .5) (2, .8) (3, .7) (2.5, .6): hull (1,.5)-(2,.8), flat to x=3.
  pts = np.array([[1, .5], [2, .8], [3, .7], [2.5, .6]])
  assert report.aiq(pts) == pytest.approx((0.65 + 0.8) / 3)
  # A point under the chord is lifted by the hull: (0,0) (1,.2) (2,1) -> area 1 / 2.
  assert report.aiq(np.array([[0, 0], [1, .2], [2, 1.0]])) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- bootstrap


def test_cis_bracket_point_estimates(run):
  intervals = run["json"]["bootstrap"]["intervals"]
  assert {"routed_cost_per_1k", "savings_pct", "routed_accuracy",
          "stages.classify.routed_accuracy", "stages.classify.error_non_escalated",
          "stages.extract.error_non_escalated"} <= set(intervals)
  for name, ci in intervals.items():
    assert ci["lo"] <= ci["estimate"] <= ci["hi"], name
    assert ci["lo"] < ci["hi"], name
  j = run["json"]
  assert intervals["routed_cost_per_1k"]["estimate"] == j["cost"]["routed_per_1k"]
  assert intervals["stages.classify.error_non_escalated"]["estimate"] == \
      j["stages"]["classify"]["quality"]["error_non_escalated"]


def test_bootstrap_is_seeded():
  rng = np.random.default_rng(1)
  vec = {"x": rng.random(50), "one": np.ones(50)}
  metric = {"mean": lambda s: s["x"] / s["one"]}
  a = report.bootstrap(vec, metric, 50, resamples=200, seed=3)
  assert a == report.bootstrap(vec, metric, 50, resamples=200, seed=3)
  assert a != report.bootstrap(vec, metric, 50, resamples=200, seed=4)


# ----------------------------------------------------------------------------- outputs


def test_pngs_and_self_contained_html(run):
  with open(os.path.join(run["out"], "report.html"), encoding="utf-8") as f:
    page = f.read()
  for name in report.CHARTS:
    path = os.path.join(run["out"], name)
    with open(path, "rb") as f:
      data = f.read()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    assert f'href="{name}"' in page
    assert "data:image/png;base64," + base64.b64encode(data).decode() in page
  assert report_fixtures.SMALL in page and report_fixtures.PRICE_BOOK in page
  assert "oracle" in page.lower() and "AIQ" in page


def test_notes_state_estimates(run):
  notes = " ".join(run["json"]["notes"])
  for phrase in ("frontier-only quality is unknown", "estimated=true",
                 "assumed right", "duplicate rows dropped", "have no label"):
    assert phrase in notes
  assert run["json"]["mode"] == "cost_and_quality"


def test_cost_only_without_labels(run, tmp_path, capsys):
  out = str(tmp_path / "rep")
  assert report_command.main([run["root"], "--out", out, "--resamples", "200"]) == 0
  assert "report.html" in capsys.readouterr().out
  with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
    j = json.load(f)
  assert j["mode"] == "cost_only" and j["quality"] is None
  assert all(s["quality"] is None and s["oracle"] is None for s in j["stages"].values())
  without_labels = dict(run["json"]["cost"], savings_quality=j["cost"]["savings_quality"])
  assert j["cost"] == without_labels
  # Beside every saving, without labels: quality unknown (the card, the chart, the table).
  assert j["cost"]["savings_quality"].startswith("quality unknown")
  # The rows name a calibration the report was not given: it says it cannot state it.
  assert j["guarantee"] == [
      "Guarantee not stated: the run used calibration cal-test-1, but its file was not given "
      "(--calibration FILE), so this report cannot say what it bounds."]
  page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
  assert page.count("quality unknown") >= 1 and ">unknown<" in page
  assert set(j["bootstrap"]["intervals"]) == {"routed_cost_per_1k", "savings_pct"}
  curve = j["stages"]["classify"]["threshold_curve"]
  assert curve["aiq"] is None and "accuracy" not in curve["points"][0]
  assert curve["records"] == 240
  assert any("cost-only" in n for n in j["notes"])
  for name in report.CHARTS:
    assert os.path.getsize(os.path.join(out, name)) > 10_000


def test_without_small_answer_reports_cost_figures_only(tmp_path):
  info = report_fixtures.write_run(str(tmp_path), small_answer=False)
  rep = report.build_report(str(tmp_path), info["labels"], out_dir=str(tmp_path / "rep"),
                            resamples=100)
  q = rep["stages"]["classify"]["quality"]
  assert q["small_only_accuracy"] is None and rep["stages"]["classify"]["oracle"] is None
  assert q["routed_accuracy"] is not None
  assert rep["stages"]["classify"]["threshold_curve"]["aiq"] is None
  assert any("small_answer" in n and "cannot be computed" in n for n in rep["notes"])
  assert os.path.getsize(tmp_path / "rep" / "cost_quality.png") > 10_000


def test_label_field_errors(run, capsys):
  assert report_command.main([run["root"], "--labels", run["labels"], "--label-field",
                      "summarise=category", "--out", "/nonexistent/never"]) == 2
  assert "summarise" in capsys.readouterr().err
  with pytest.raises(ValueError, match="not in the labels"):
    report.build_report(run["root"], run["labels"], {"classify": "nope"}, charts=False)
  with pytest.raises(ValueError, match="no results Parquet"):
    report.build_report(os.path.join(run["root"], "dead_letter", "nothing"))


def test_parquet_labels_and_explicit_fields(run):
  import pyarrow as pa
  import pyarrow.parquet as pq
  with open(run["labels"], encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  path = os.path.join(os.path.dirname(run["labels"]), "labels.parquet")
  pq.write_table(pa.Table.from_pylist(rows), path)
  rep = report.build_report(run["root"], path, {"classify": "category"}, id_field="ticket_id",
                            resamples=50, charts=False)
  # Given fields override the defaults for their stage; other stages keep the defaults.
  assert rep["inputs"]["label_fields"] == run["json"]["inputs"]["label_fields"]
  for stage in ("classify", "extract"):
    assert report_render._jsonable(rep["stages"][stage]["quality"]) == \
        run["json"]["stages"][stage]["quality"]
  rep = report.build_report(run["root"], path, {"extract": ["order_id"]}, resamples=50,
                            charts=False)
  assert rep["stages"]["extract"]["quality"]["label_fields"] == ["order_id"]
  assert rep["stages"]["extract"]["quality"]["routed_accuracy"] >= \
      run["json"]["stages"]["extract"]["quality"]["routed_accuracy"]
