"""The passthrough pipeline in the portable Runner API form that Dataflow and Flink take.

Translation is checked on the proto itself; the round trips run the proto
(rebuilt in this process, in a fresh interpreter, and through PortableRunner's
embedded job service) against the real broker and compare with a direct run.
"""

import os
import subprocess
import sys
import textwrap

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability import common_urns, python_urns
from apache_beam.portability.api import beam_runner_api_pb2, standard_window_fns_pb2
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.runners.portability.portable_runner import PortableRunner

from tierflow import launcher
from tierflow_local.loader import publish

P = common_urns.primitives
# What every portable runner executes itself; everything else must be a composite.
RUNNER_PRIMITIVES = {P.IMPULSE.urn, P.PAR_DO.urn, P.GROUP_BY_KEY.urn, P.FLATTEN.urn,
                     P.ASSIGN_WINDOWS.urn}
KNOWN_COMPOSITES = {u.urn for u in (common_urns.composites.RESHUFFLE,
                                    common_urns.composites.COMBINE_PER_KEY,
                                    common_urns.composites.COMBINE_GLOBALLY,
                                    common_urns.composites.WRITE_FILES)}
KNOWN_COMPOSITES.add(python_urns.GENERIC_COMPOSITE_TRANSFORM)
BOUNDED = beam_runner_api_pb2.IsBounded.BOUNDED
UNBOUNDED = beam_runner_api_pb2.IsBounded.UNBOUNDED


def argv(broker, topic, output, *flags):
  return ["--bootstrap-servers", broker.bootstrap_servers, "--topic", topic,
          "--output", output, *flags]


def build_proto(*flags):
  p, _ = launcher.build("passthrough", ["--bootstrap-servers", "127.0.0.1:9", "--topic", "t",
                                        "--output", "/nonexistent/out", "--preflight", "never",
                                        *flags])
  return p.to_runner_api()


def leaves(proto):
  return {t.unique_name: t for t in proto.components.transforms.values() if not t.subtransforms}


def by_name(proto, suffix):
  [t] = [t for t in proto.components.transforms.values() if t.unique_name.endswith(suffix)]
  return t


def pardo_payload(transform):
  return beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)


def output_bounds(proto, transform):
  pcs = proto.components.pcollections
  return {pcs[pc].is_bounded for pc in transform.outputs.values()}


def test_bounded_pipeline_translates():
  proto = build_proto("--bounded")
  assert beam_runner_api_pb2.Pipeline.FromString(proto.SerializeToString()) == proto
  names = leaves(proto)
  urns = {t.spec.urn for t in names.values()}
  assert urns <= RUNNER_PRIMITIVES, urns - RUNNER_PRIMITIVES
  for tid, t in proto.components.transforms.items():
    if t.subtransforms and tid not in proto.root_transform_ids:  # the root has no URN
      assert t.spec.urn in KNOWN_COMPOSITES, (t.unique_name, t.spec.urn)

  impulse = by_name(proto, "ReadKafka/Impulse")
  assert impulse.spec.urn == P.IMPULSE.urn
  read = by_name(proto, "ReadKafka/ReadPartitions")
  payload = pardo_payload(read)
  assert payload.restriction_coder_id in proto.components.coders
  # Offsets are committed by an ordinary DoFn after the write, never on bundle
  # finalization (which Flink batch does not support).
  assert not any(pardo_payload(t).requests_finalization for t in names.values()
                 if t.spec.urn == P.PAR_DO.urn)
  assert "beam:requirement:pardo:splittable_dofn:v1" in proto.requirements
  assert "beam:requirement:pardo:finalization:v1" not in proto.requirements
  # No shuffle holds the data: the only GroupByKey is the reshuffle of the partition
  # ranges, before the read; read, decode, write and commit run as one chain.
  gbks = [n for n, t in names.items() if t.spec.urn == P.GROUP_BY_KEY.urn]
  assert len(gbks) == 1 and "SpreadPartitions" in gbks[0], gbks
  assert not [n for n, t in names.items() if t.spec.urn == P.FLATTEN.urn]
  assert by_name(proto, "ReadKafka/SpreadPartitions").spec.urn == \
      common_urns.composites.RESHUFFLE.urn
  assert by_name(proto, "CommitOffsets/Commit").spec.urn == P.PAR_DO.urn

  envs = proto.components.environments
  assert envs
  for t in names.values():
    if t.spec.urn == P.PAR_DO.urn:
      assert t.environment_id in envs
  assert all(pc.is_bounded == BOUNDED for pc in proto.components.pcollections.values())


def test_streaming_pipeline_translates():
  proto = build_proto("--streaming", "--flush-seconds", "2")
  read = by_name(proto, "ReadKafka/ReadPartitions")
  assert pardo_payload(read).restriction_coder_id in proto.components.coders
  assert output_bounds(proto, by_name(proto, "ReadKafka/Impulse")) == {BOUNDED}
  assert output_bounds(proto, by_name(proto, "ReadKafka/ResolveOffsetRanges")) == {BOUNDED}
  assert output_bounds(proto, read) == {UNBOUNDED}
  for name in ("Decode/Decode", "WriteParquet/WriteFiles", "CommitOffsets/Commit"):
    assert output_bounds(proto, by_name(proto, name)) == {UNBOUNDED}, name
  assert {t.spec.urn for t in leaves(proto).values()} <= RUNNER_PRIMITIVES
  # Files are cut by the reader (offset boundaries, --flush-seconds), not by windows.
  assert not [t for t in leaves(proto).values() if t.spec.urn == P.ASSIGN_WINDOWS.urn]


def test_portable_runner_proto_preparation():
  """What PortableRunner (Flink, Spark, the job service) submits, prepared offline."""
  p, _ = launcher.build("passthrough", [
      "--bootstrap-servers", "127.0.0.1:9", "--topic", "t", "--output", "/nonexistent",
      "--preflight=never", "--runner=PortableRunner", "--environment_type=DOCKER"])
  proto = PortableRunner.get_proto_pipeline(p, p.options)
  [env] = {t.environment_id for t in leaves(proto).values() if t.environment_id}
  environment = proto.components.environments[env]
  assert environment.urn == common_urns.environments.DOCKER.urn
  image = beam_runner_api_pb2.DockerPayload.FromString(environment.payload).container_image
  assert "beam_python" in image and beam.__version__ in image
  assert environment.capabilities
  read = [t for t in proto.components.transforms.values()
          if t.unique_name.endswith("ReadKafka/ReadPartitions")]
  assert read and pardo_payload(read[0]).restriction_coder_id
  assert {t.spec.urn for t in leaves(proto).values()} <= RUNNER_PRIMITIVES


@pytest.fixture
def published(broker, topic, make_tickets):
  name = topic(partitions=3)
  publish(broker.bootstrap_servers, name, make_tickets(300, step_ms=900_000))
  return name


def _rows(read_duckdb, output):
  return (read_duckdb(f"{output}/results"), read_duckdb(f"{output}/dead_letter"))


def test_round_trip_through_the_proto_gives_the_same_rows(broker, published, output_dir,
                                                         tmp_path_factory, read_duckdb,
                                                         committed):
  direct = launcher.launch("passthrough", argv(broker, published, output_dir, "--bounded",
                                               "--group-id", "direct"))
  assert direct.rows_written == 300

  other = str(tmp_path_factory.mktemp("roundtrip"))
  flags = argv(broker, published, other, "--bounded", "--group-id", "roundtrip")
  p, _ = launcher.build("passthrough", flags)
  proto = beam_runner_api_pb2.Pipeline.FromString(p.to_runner_api().SerializeToString())
  rebuilt = beam.Pipeline.from_runner_api(proto, FnApiRunner(), PipelineOptions(flags))
  rebuilt.run().wait_until_finish()
  assert _rows(read_duckdb, other) == _rows(read_duckdb, output_dir)
  assert committed(published, "roundtrip", 3) == committed(published, "direct", 3)


@pytest.mark.slow
def test_round_trip_in_a_fresh_interpreter(broker, published, output_dir, tmp_path_factory,
                                           read_duckdb):
  """The proto alone, run by another process, does the work: no construction-time state."""
  launcher.launch("passthrough", argv(broker, published, output_dir, "--bounded",
                                      "--commit-offsets", "never"))
  other = str(tmp_path_factory.mktemp("fresh"))
  flags = argv(broker, published, other, "--bounded", "--commit-offsets", "never")
  p, _ = launcher.build("passthrough", flags)
  proto_path = os.path.join(str(tmp_path_factory.mktemp("proto")), "pipeline.pb")
  with open(proto_path, "wb") as f:
    f.write(p.to_runner_api().SerializeToString())
  script = textwrap.dedent("""
      import sys
      import apache_beam as beam
      from apache_beam.options.pipeline_options import PipelineOptions
      from apache_beam.portability.api import beam_runner_api_pb2, standard_window_fns_pb2
      from apache_beam.runners.portability.fn_api_runner import FnApiRunner
      with open(sys.argv[1], "rb") as f:
        proto = beam_runner_api_pb2.Pipeline.FromString(f.read())
      p = beam.Pipeline.from_runner_api(proto, FnApiRunner(), PipelineOptions([]))
      print(p.run().wait_until_finish())
  """)
  done = subprocess.run([sys.executable, "-c", script, proto_path], capture_output=True,
                        text=True, timeout=300, cwd=str(tmp_path_factory.getbasetemp()))
  assert done.returncode == 0, done.stderr[-3000:]
  assert "DONE" in done.stdout
  results, dead = _rows(read_duckdb, other)
  assert len(results) == 300 and dead == []
  assert (results, dead) == _rows(read_duckdb, output_dir)


def test_portable_runner_with_embedded_job_service(broker, published, output_dir,
                                                   tmp_path_factory, read_duckdb, committed):
  """PortableRunner end to end: job service (in-process), LOOPBACK SDK workers over gRPC."""
  direct_out = str(tmp_path_factory.mktemp("direct"))
  launcher.launch("passthrough", argv(broker, published, direct_out, "--bounded",
                                      "--group-id", "direct"))
  summary = launcher.launch("passthrough", argv(
      broker, published, output_dir, "--bounded", "--group-id", "portable",
      "--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"))
  assert summary.state == "DONE"
  assert _rows(read_duckdb, output_dir) == _rows(read_duckdb, direct_out)
  # Bundle finalization reaches the job service's SDK workers too: offsets are committed.
  assert committed(published, "portable", 3) == committed(published, "direct", 3)
  assert sum(committed(published, "portable", 3).values()) == 300
