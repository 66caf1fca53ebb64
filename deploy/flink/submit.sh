#!/usr/bin/env bash
# Submits tierflow to the Flink session cluster (deploy/flink/flink-session.yaml).
#
#   submit.sh streaming                 unbounded read, checkpoints every
#                                       CHECKPOINT_MS; returns once submitted
#   submit.sh backfill START END        bounded read of [START, END) (epoch ms or
#                                       ISO-8601); waits, exits non-zero on failure
#
# Environment: FLINK_MASTER (host:8081, default tierflow-flink-rest:8081),
# BOOTSTRAP_SERVERS, TOPIC, OUTPUT, PIPELINE (passthrough), FORMAT (json),
# FLINK_VERSION (1.20; must match the cluster), PARALLELISM,
# SDK_WORKER_PARALLELISM (Python workers per TaskManager; default 2 = task
# slots), CHECKPOINT_MS (60000), SUBMIT_MODE and EXTRA_ARGS (appended).
#
# SUBMIT_MODE=uber-jar (default): --flink_submit_uber_jar. Python builds a jar
#   (Beam's Flink job server + the pipeline + its artifacts) and uploads it
#   through Flink's REST API. No Java needed where this runs; the job-server jar
#   is downloaded from Maven Central unless baked into the image
#   (BAKE_JOB_SERVER_JAR=true in deploy/flink/Dockerfile).
# SUBMIT_MODE=job-server: Beam starts its Java Flink job server locally (needs
#   `java` here), which submits the job. Staged artifacts must then be readable
#   by the TaskManagers: set ARTIFACTS_DIR to shared storage (s3://..., gs://...).
#
# Offsets: on portable Flink, bundle finalization (tierflow's Kafka offset
# commits) runs only in STREAMING mode, after checkpoints complete. Flink BATCH
# mode does not support it (apache/beam#19526; a bundle that asks for it fails
# with "Portable Flink runner doesn't support bundle finalization in batch
# mode"). A backfill is batch, so it must read an explicit range and never
# commit: this script always passes an explicit time range and
# --commit-offsets never.
#
# Uses flink_run.py (= `tierflow run` that also accepts --checkpointing_interval,
# which tierflow's strict flag check would otherwise reject).
# Not run against a Flink cluster here (no Java/Kubernetes in the environment
# this was written in).
set -euo pipefail

MODE="${1:?usage: submit.sh streaming | submit.sh backfill START END}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
: "${BOOTSTRAP_SERVERS:?set BOOTSTRAP_SERVERS}" "${TOPIC:?set TOPIC}" "${OUTPUT:?set OUTPUT}"
PIPELINE="${PIPELINE:-passthrough}"
FLINK_MASTER="${FLINK_MASTER:-tierflow-flink-rest:8081}"
FLINK_VERSION="${FLINK_VERSION:-${TIERFLOW_FLINK_VERSION:-1.20}}"
BEAM_VERSION="$("${PYTHON}" -c 'import apache_beam; print(apache_beam.__version__)')"

args=(
  "${PIPELINE}"
  --bootstrap-servers "${BOOTSTRAP_SERVERS}"
  --topic "${TOPIC}"
  --output "${OUTPUT}"
  --format "${FORMAT:-json}"
  --runner FlinkRunner
  --flink_master "${FLINK_MASTER}"
  --flink_version "${FLINK_VERSION}"
  --environment_type EXTERNAL
  --environment_config localhost:50000
  --sdk_worker_parallelism "${SDK_WORKER_PARALLELISM:-2}"
)
[ -n "${PARALLELISM:-}" ] && args+=(--parallelism "${PARALLELISM}")

case "${SUBMIT_MODE:-uber-jar}" in
  uber-jar)
    args+=(--flink_submit_uber_jar)
    jar="/opt/apache/beam/jars/beam-runners-flink-${FLINK_VERSION}-job-server-${BEAM_VERSION}.jar"
    [ -f "${jar}" ] && args+=(--flink_job_server_jar "${jar}")
    ;;
  job-server)
    command -v java >/dev/null || { echo "SUBMIT_MODE=job-server needs java" >&2; exit 2; }
    : "${ARTIFACTS_DIR:?set ARTIFACTS_DIR to storage the TaskManagers can read}"
    args+=(--artifacts_dir "${ARTIFACTS_DIR}")
    ;;
  *) echo "SUBMIT_MODE is uber-jar or job-server" >&2; exit 2 ;;
esac

case "${MODE}" in
  streaming)
    args+=(--streaming --checkpointing_interval "${CHECKPOINT_MS:-60000}" --no-wait)
    [ -n "${GROUP_ID:-}" ] && args+=(--group-id "${GROUP_ID}")
    ;;
  backfill)
    START="${2:?backfill needs START and END}"
    END="${3:?backfill needs START and END}"
    args+=(--start-time "${START}" --end-time "${END}" --commit-offsets never)
    ;;
  *) echo "usage: submit.sh streaming | submit.sh backfill START END" >&2; exit 2 ;;
esac

# shellcheck disable=SC2206
[ -n "${EXTRA_ARGS:-}" ] && args+=(${EXTRA_ARGS})
echo "+ flink_run.py ${args[*]}" >&2
exec "${PYTHON}" "${HERE}/flink_run.py" "${args[@]}"
