#!/usr/bin/env bash
# Nightly backfill on Dataflow: one bounded run over a time range
# [START, END) from the batch Flex Template. Defaults to yesterday (UTC).
#
#   source <(deploy/dataflow/build.sh | tail -3)   # IMAGE, BATCH_TEMPLATE, ...
#   PROJECT=... REGION=... BUCKET=... SUBNETWORK=regions/R/subnetworks/S \
#   BOOTSTRAP_SERVERS=10.0.0.5:9092,10.0.0.6:9092 TOPIC=tickets \
#   OUTPUT=gs://my-bucket/tierflow/tickets \
#     deploy/dataflow/run-batch.sh [START END]
#
# START/END: epoch millis or ISO-8601 (2026-11-20, 2026-11-20T00:00:00Z).
# An explicit range never commits consumer-group offsets (commit_offsets=auto),
# so a backfill does not move the streaming job's position. Re-running the
# same range with the same OUTPUT and rows_per_file rewrites the same file
# names (replacing them), so a failed night can simply be run again.
# BATCH_TIERS=small,frontier sends those tiers through the providers' batch APIs at
# half price (the job then waits for the batches, up to 24 h; model pipelines only).
# WAIT=true (default) polls until the job finishes and exits non-zero unless it
# succeeded, so a scheduler sees the outcome.
#
# Not run here (no GCP access in the environment this was written in).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=_common.sh
. "${HERE}/_common.sh"
: "${BATCH_TEMPLATE:?set BATCH_TEMPLATE (printed by build.sh)}"

START="${1:-${START:-$(date -u -d 'yesterday' +%Y-%m-%dT00:00:00Z)}}"
END="${2:-${END:-$(date -u +%Y-%m-%dT00:00:00Z)}}"
JOB="$(job_name "tierflow-${PIPELINE}-${TOPIC}-backfill-${START%%T*}-$(date -u +%H%M%S)")"

mapfile -t FLAGS < <(common_flags)
JOB_ID="$(gcloud dataflow flex-template run "${JOB}" \
  --template-file-gcs-location "${BATCH_TEMPLATE}" \
  "${FLAGS[@]}" \
  --additional-experiments use_runner_v2 \
  --parameters "$(params \
      "pipeline=${PIPELINE}" \
      "bootstrap_servers=${BOOTSTRAP_SERVERS}" \
      "topic=${TOPIC}" \
      "output=${OUTPUT}" \
      "format=${FORMAT}" \
      "schema=${SCHEMA:-}" \
      "schema_registry_url=${SCHEMA_REGISTRY_URL:-}" \
      "start_time=${START}" \
      "end_time=${END}" \
      "kafka_consumer_config=${KAFKA_CONSUMER_CONFIG:-}" \
      "config=${CONFIG:-}" \
      "calibration=${CALIBRATION:-}" \
      "batch_tiers=${BATCH_TIERS:-}" \
      "sdk_container_image=${IMAGE}")" \
  --format 'value(job.id)')"
echo "submitted ${JOB} (${JOB_ID}): ${TOPIC} [${START}, ${END}) -> ${OUTPUT}"

[ "${WAIT:-true}" = true ] || exit 0
while :; do
  state="$(gcloud dataflow jobs describe "${JOB_ID}" --project "${PROJECT}" \
             --region "${REGION}" --format 'value(currentState)')"
  case "${state}" in
    JOB_STATE_DONE) echo "${JOB_ID}: ${state}"; exit 0 ;;
    JOB_STATE_FAILED|JOB_STATE_CANCELLED|JOB_STATE_DRAINED|JOB_STATE_UPDATED)
      echo "${JOB_ID}: ${state}" >&2; exit 1 ;;
  esac
  sleep 30
done
