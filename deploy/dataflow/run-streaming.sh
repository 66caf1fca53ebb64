#!/usr/bin/env bash
# The streaming job on Dataflow: reads TOPIC unboundedly from the consumer
# group's committed offsets (else the earliest) and commits offsets as the
# runner finalizes bundles, i.e. after their Parquet files are written.
#
#   PROJECT=... REGION=... BUCKET=... IMAGE=... STREAMING_TEMPLATE=... \
#   SUBNETWORK=regions/R/subnetworks/S BOOTSTRAP_SERVERS=10.0.0.5:9092 \
#   TOPIC=tickets OUTPUT=gs://my-bucket/tierflow/tickets \
#     deploy/dataflow/run-streaming.sh
#
# STREAMING_MODE=exactly-once (default, Dataflow's default) or at-least-once
# (cheaper; duplicates possible, and tierflow's deterministic record_id makes
# them easy to drop downstream). https://cloud.google.com/dataflow/docs/guides/streaming-modes
# Replace a running job in place with UPDATE=true (same job name).
#
# Not run here (no GCP access in the environment this was written in).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=_common.sh
. "${HERE}/_common.sh"
: "${STREAMING_TEMPLATE:?set STREAMING_TEMPLATE (printed by build.sh)}"

JOB="$(job_name "${JOB_NAME:-tierflow-${PIPELINE}-${TOPIC}}")"
EXPERIMENTS="use_runner_v2"
case "${STREAMING_MODE:-exactly-once}" in
  exactly-once) ;;
  at-least-once) EXPERIMENTS="${EXPERIMENTS},streaming_mode_at_least_once" ;;
  *) echo "STREAMING_MODE is exactly-once or at-least-once" >&2; exit 2 ;;
esac

mapfile -t FLAGS < <(common_flags)
[ "${UPDATE:-false}" = true ] && FLAGS+=(--update)
gcloud dataflow flex-template run "${JOB}" \
  --template-file-gcs-location "${STREAMING_TEMPLATE}" \
  "${FLAGS[@]}" \
  --enable-streaming-engine \
  --additional-experiments "${EXPERIMENTS}" \
  --parameters "$(params \
      "pipeline=${PIPELINE}" \
      "streaming=true" \
      "bootstrap_servers=${BOOTSTRAP_SERVERS}" \
      "topic=${TOPIC}" \
      "output=${OUTPUT}" \
      "format=${FORMAT}" \
      "schema=${SCHEMA:-}" \
      "schema_registry_url=${SCHEMA_REGISTRY_URL:-}" \
      "group_id=${GROUP_ID:-}" \
      "kafka_consumer_config=${KAFKA_CONSUMER_CONFIG:-}" \
      "config=${CONFIG:-}" \
      "calibration=${CALIBRATION:-}" \
      "sdk_container_image=${IMAGE}")"
