#!/usr/bin/env bash
# Builds the tierflow image with Cloud Build and the two Flex Template specs
# that point at it:
#   gs://$BUCKET/templates/tierflow-batch-$TAG.json      (backfills: bounded reads)
#   gs://$BUCKET/templates/tierflow-streaming-$TAG.json  (streaming: metadata has
#       streaming/supportsAtLeastOnce/supportsExactlyOnce/defaultStreamingMode)
# Both come from the same image and metadata.json; the batch spec drops the
# streaming-only keys. Prints the variables run-batch.sh / run-streaming.sh need.
#
#   PROJECT=my-proj REGION=europe-west1 REPOSITORY=tierflow BUCKET=my-bucket \
#     deploy/dataflow/build.sh
#
# Not run here (no GCP access in the environment this was written in).
set -euo pipefail

: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${REPOSITORY:?set REPOSITORY}" "${BUCKET:?set BUCKET}"
TAG="${TAG:-$(date -u +%Y%m%d-%H%M%S)}"
BEAM_VERSION="${BEAM_VERSION:-2.77.0}"
IMAGE="${IMAGE:-${REGION}-docker.pkg.dev/${PROJECT}/${REPOSITORY}/tierflow:${TAG}}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HERE}/../.." && pwd)"

echo "== image ${IMAGE}"
gcloud builds submit "${ROOT}" \
  --project "${PROJECT}" --region "${REGION}" \
  --config "${HERE}/cloudbuild.yaml" \
  --substitutions "_IMAGE=${IMAGE},_BEAM_VERSION=${BEAM_VERSION}"

BATCH_METADATA="$(mktemp --suffix=.json)"
trap 'rm -f "${BATCH_METADATA}"' EXIT
python3 - "${HERE}/metadata.json" "${BATCH_METADATA}" <<'PY'
import json, sys
meta = json.load(open(sys.argv[1]))
for key in ("streaming", "supportsAtLeastOnce", "supportsExactlyOnce", "defaultStreamingMode"):
    meta.pop(key, None)
meta["name"] += "-batch"
json.dump(meta, open(sys.argv[2], "w"), indent=2)
PY

for kind in batch streaming; do
  template="gs://${BUCKET}/templates/tierflow-${kind}-${TAG}.json"
  metadata="${HERE}/metadata.json"
  [ "${kind}" = batch ] && metadata="${BATCH_METADATA}"
  echo "== template ${template}"
  gcloud dataflow flex-template build "${template}" \
    --project "${PROJECT}" \
    --image "${IMAGE}" \
    --sdk-language PYTHON \
    --metadata-file "${metadata}"
done

cat <<OUT

export IMAGE=${IMAGE}
export BATCH_TEMPLATE=gs://${BUCKET}/templates/tierflow-batch-${TAG}.json
export STREAMING_TEMPLATE=gs://${BUCKET}/templates/tierflow-streaming-${TAG}.json
OUT
