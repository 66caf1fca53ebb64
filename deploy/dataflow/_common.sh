# Shared settings for run-batch.sh and run-streaming.sh (sourced, not run).
# Required: PROJECT REGION BUCKET IMAGE BOOTSTRAP_SERVERS TOPIC OUTPUT and
# BATCH_TEMPLATE / STREAMING_TEMPLATE (printed by build.sh).
# Networking: Kafka is private, so the workers (and the launcher VM) run in a
# VPC subnetwork that can route to every broker's advertised listener:
#   SUBNETWORK=regions/REGION/subnetworks/NAME (or a full URL; Shared VPC: the
#   host project's URL). Without public IPs (the default here) the image must
#   already hold every dependency (it does) and the subnet needs Private Google
#   Access for Cloud Storage / Dataflow APIs; add Cloud NAT only if the job
#   must reach something outside the VPC.
# SERVICE_ACCOUNT: the worker service account (roles/dataflow.worker, write on
#   the output bucket, and secretAccessor on the model API-key secrets only).

: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET}"
: "${IMAGE:?set IMAGE (the image build.sh pushed)}"
: "${BOOTSTRAP_SERVERS:?set BOOTSTRAP_SERVERS (host:port[,host:port])}"
: "${TOPIC:?set TOPIC}" "${OUTPUT:?set OUTPUT (gs://...)}"
PIPELINE="${PIPELINE:-passthrough}"
FORMAT="${FORMAT:-json}"
MAX_WORKERS="${MAX_WORKERS:-4}"
WORKER_MACHINE_TYPE="${WORKER_MACHINE_TYPE:-n2-standard-2}"

# gcloud --parameters splits on commas; bootstrap lists and per-partition
# offsets contain commas, so every call uses the ^~^ custom delimiter
# (gcloud topic escaping). Values must not contain '~'.
params() {
  local out="^~^" sep="" kv
  for kv in "$@"; do
    [ -n "${kv#*=}" ] || continue   # skip empty optional parameters
    case "${kv}" in *"~"*) echo "parameter ${kv%%=*} contains '~'" >&2; return 1 ;; esac
    out="${out}${sep}${kv}"
    sep="~"
  done
  printf '%s' "${out}"
}

# Flags shared by every run. Custom containers (sdk_container_image) need
# Dataflow Runner v2, which current Python SDKs use by default; the scripts pass
# --additional-experiments use_runner_v2 to keep that explicit.
common_flags() {
  local flags=(
    --project "${PROJECT}"
    --region "${REGION}"
    --temp-location "gs://${BUCKET}/tmp"
    --staging-location "gs://${BUCKET}/staging"
    --max-workers "${MAX_WORKERS}"
    --worker-machine-type "${WORKER_MACHINE_TYPE}"
  )
  [ -n "${SUBNETWORK:-}" ] && flags+=(--subnetwork "${SUBNETWORK}")
  [ -n "${SERVICE_ACCOUNT:-}" ] && flags+=(--service-account-email "${SERVICE_ACCOUNT}")
  [ "${PUBLIC_IPS:-false}" = true ] || flags+=(--disable-public-ips)
  printf '%s\n' "${flags[@]}"
}

job_name() {  # Dataflow job names: [-a-z0-9], starting with a letter
  printf '%s' "$*" | tr '[:upper:]_.:' '[:lower:]---' | tr -cd 'a-z0-9-' | cut -c1-63
}
