#!/usr/bin/env bash
# Installs the real engines the tests run on, into ENGINES (default: .engines/ at the repo root):
#   flink/      Beam's Flink job server (Beam 2.62.0, Flink 1.19; see deploy/flink/jobserver/pom.xml)
#   flink-dist/ Flink 1.19.3's jars for a session cluster (PyPI apache-flink-libraries sdist;
#               Maven Central does not serve flink-dist)
#   prism/      Beam's Prism runner, built from the Go module at the Python SDK's Beam version
#   kafka/      Apache Kafka 4.4.0 (KRaft), its runtime class path from Maven Central
#   apicurio/   Apicurio Registry 3.3.3 (Confluent-compatible API), from Maven Central
# Idempotent: what is already there is kept (delete a directory to refetch it). Maven's
# local repository (~/.m2) and Go's module cache make a second machine-local run fast.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
ENGINES=${ENGINES:-$ROOT/.engines}
PYTHON=${PYTHON:-python3}
mkdir -p "$ENGINES"
MVN=(mvn -q -B -ntp)
say() { echo "engines: $*" >&2; }

if [ ! -f "$ENGINES/flink/beam-flink-job-server.jar" ]; then
  say "Beam's Flink job server (Maven Central, ~150 MB)"
  BUILD="$ENGINES/flink.build"
  rm -rf "$BUILD" && mkdir -p "$BUILD" && cp "$ROOT/deploy/flink/jobserver/pom.xml" "$BUILD/"
  "${MVN[@]}" -f "$BUILD/pom.xml" package
  rm -rf "$ENGINES/flink" && mkdir -p "$ENGINES/flink"
  mv "$BUILD"/target/beam-flink-job-server-2*.jar "$ENGINES/flink/beam-flink-job-server.jar"
  rm -rf "$BUILD"
fi

if [ ! -f "$ENGINES/flink-dist/deps/lib/flink-dist-1.19.3.jar" ]; then
  say "Flink 1.19.3 for a session cluster (PyPI apache-flink-libraries, ~230 MB)"
  rm -rf "$ENGINES/flink-dist" "$ENGINES/flink-dist.build" && mkdir -p "$ENGINES/flink-dist.build"
  "$PYTHON" - "$ENGINES/flink-dist.build" <<'PY'
import hashlib, re, sys, tarfile, urllib.request
out, name = sys.argv[1], "apache-flink-libraries-1.19.3.tar.gz"
sha256 = "4a58e3a1fb7d83340bc96b6c080624c6d792d69fae5d294b96224775204a9c60"
index = urllib.request.urlopen("https://pypi.org/simple/apache-flink-libraries/").read().decode()
url = re.search(r'href="([^"#]*/' + re.escape(name) + ')#', index).group(1)
urllib.request.urlretrieve(url, f"{out}/{name}")
digest = hashlib.sha256(open(f"{out}/{name}", "rb").read()).hexdigest()
if digest != sha256:
    sys.exit(f"{name}: sha256 {digest}, expected {sha256}")
with tarfile.open(f"{out}/{name}") as tar:
    tar.extractall(out, members=[m for m in tar.getmembers() if "/deps/" in m.name], filter="data")
PY
  mv "$ENGINES"/flink-dist.build/apache-flink-libraries-1.19.3 "$ENGINES/flink-dist"
  rm -rf "$ENGINES/flink-dist.build"
fi

BEAM_VERSION=$("$PYTHON" -c "import apache_beam; print(apache_beam.__version__)")
if [ ! -x "$ENGINES/prism/v$BEAM_VERSION/prism" ]; then
  say "Beam's Prism runner v$BEAM_VERSION (Go module proxy)"
  mkdir -p "$ENGINES/prism/v$BEAM_VERSION"
  GOBIN="$ENGINES/prism/v$BEAM_VERSION" GOFLAGS=-mod=mod \
      go install "github.com/apache/beam/sdks/v2/go/cmd/prism@v$BEAM_VERSION"
fi

if [ ! -f "$ENGINES/kafka/lib/kafka_2.13-4.4.0.jar" ]; then
  say "Apache Kafka 4.4.0 (Maven Central, ~45 MB)"
  rm -rf "$ENGINES/kafka" && mkdir -p "$ENGINES/kafka"
  "${MVN[@]}" -f "$HERE/kafka/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$ENGINES/kafka/lib"
  cp "$HERE/kafka/log4j2.properties" "$ENGINES/kafka/"
fi

if [ ! -f "$ENGINES/apicurio/app/quarkus-run.jar" ]; then
  say "Apicurio Registry 3.3.3 (Maven Central, ~160 MB)"
  rm -rf "$ENGINES/apicurio" && mkdir -p "$ENGINES/apicurio/app"
  "${MVN[@]}" dependency:copy -Dartifact=io.apicurio:apicurio-registry-app:3.3.3:tar.gz:all \
      -DoutputDirectory="$ENGINES/apicurio"
  tar xzf "$ENGINES/apicurio/apicurio-registry-app-3.3.3-all.tar.gz" -C "$ENGINES/apicurio/app"
  rm -f "$ENGINES/apicurio/apicurio-registry-app-3.3.3-all.tar.gz"
fi
say "ready in $ENGINES"
