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
# FLINK_VERSION (1.19: the Flink of the job server baked into the image; must match
# the cluster), FLINK_JOB_SERVER_JAR (the baked jar), WORKER_POOL (the Python worker
# pool the TaskManager reaches; localhost:50000, its sidecar), PARALLELISM,
# SDK_WORKER_PARALLELISM (Python workers per TaskManager; default 2 = task slots),
# CHECKPOINT_MS (60000), GROUP_ID, SUBMIT_MODE and EXTRA_ARGS (appended).
#
# SUBMIT_MODE=uber-jar (default): --flink_submit_uber_jar. Python adds the pipeline
#   and its artifacts to the job-server jar and uploads it through Flink's REST API;
#   no Java is needed where this runs and nothing is downloaded.
# SUBMIT_MODE=job-server: Beam starts the job server locally (needs `java` here),
#   which submits the job. Staged artifacts must then be readable by the
#   TaskManagers: set ARTIFACTS_DIR to shared storage (s3://..., gs://...).
#
# Offsets: tierflow commits Kafka offsets in an ordinary step after the files are
# written (not in bundle finalization, which Flink batch lacks), so bounded and
# streaming jobs both commit. A backfill reads an explicit time range, which never
# commits (--commit-offsets auto); this script also passes --commit-offsets never.
#
# Uses flink_run.py (= `tierflow run` that also accepts --checkpointing_interval,
# which tierflow's strict flag check would otherwise reject).
# tests/test_engines.py runs this script against a Flink 1.19 session cluster: a
# backfill in both modes and a streaming job (uber-jar).
set -euo pipefail

MODE="${1:?usage: submit.sh streaming | submit.sh backfill START END}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
: "${BOOTSTRAP_SERVERS:?set BOOTSTRAP_SERVERS}" "${TOPIC:?set TOPIC}" "${OUTPUT:?set OUTPUT}"
PIPELINE="${PIPELINE:-passthrough}"
FLINK_MASTER="${FLINK_MASTER:-tierflow-flink-rest:8081}"
FLINK_VERSION="${FLINK_VERSION:-${TIERFLOW_FLINK_VERSION:-1.19}}"
FLINK_JOB_SERVER_JAR="${FLINK_JOB_SERVER_JAR:-/opt/apache/beam/jars/beam-flink-job-server.jar}"
[ -f "${FLINK_JOB_SERVER_JAR}" ] || {
  echo "no Flink job-server jar at ${FLINK_JOB_SERVER_JAR} (deploy/flink/Dockerfile bakes it;" \
       "set FLINK_JOB_SERVER_JAR)" >&2; exit 2; }

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
  --environment_config "${WORKER_POOL:-localhost:50000}"
  --flink_job_server_jar "${FLINK_JOB_SERVER_JAR}"
  --sdk_worker_parallelism "${SDK_WORKER_PARALLELISM:-2}"
)
[ -n "${PARALLELISM:-}" ] && args+=(--parallelism "${PARALLELISM}")

case "${SUBMIT_MODE:-uber-jar}" in
  uber-jar)
    args+=(--flink_submit_uber_jar)
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
    # Without finishing bundles at checkpoints, the read's output is never flushed
    # downstream on Beam 2.62's Flink runner (no file in 160 s; tests/test_engines.py).
    args+=(--streaming --checkpointing_interval "${CHECKPOINT_MS:-60000}"
           --finish_bundle_before_checkpointing --no-wait)
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
