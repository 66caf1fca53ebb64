"""Airflow DAG: nightly tierflow backfill of one Kafka topic, one day per run.

Each run reads exactly the records of its data interval,
``[data_interval_start, data_interval_end)`` by Kafka timestamp, with
``tierflow run passthrough --start-time ... --end-time ...`` and writes
Hive-partitioned Parquet under OUTPUT.

Idempotent: an explicit range resolves to the same offsets on every run (the
first offset at or after each bound), never commits consumer-group offsets,
and tierflow names each Parquet file after the offsets it holds, so clearing
and re-running a day rewrites the same file names instead of adding files.
Consecutive days share their bound (day N's end offset is day N+1's start), so
days neither overlap nor leave gaps, provided each run starts after a record at
or past its end time exists: hence the grace-period sensor before the run.

Configuration (Airflow Variables, with defaults below):
  tierflow_bootstrap_servers, tierflow_topic, tierflow_output,
  tierflow_runner_args   Beam flags of the runner, e.g.
      --runner DataflowRunner --project P --region R --temp_location gs://B/tmp
          --sdk_container_image IMAGE --subnetwork regions/R/subnetworks/S
          --no_use_public_ips --experiments use_runner_v2
      --runner FlinkRunner --flink_master tierflow-flink-rest:8081 --flink_version 1.19
          --flink_submit_uber_jar --flink_job_server_jar JAR --environment_type EXTERNAL
          --environment_config localhost:50000
      (JAR: Beam's Flink job server, as deploy/flink/Dockerfile bakes it; without it
      Beam downloads its own for its version, which CI did not test)
    (empty: the local FnApiRunner on the Airflow worker, for small topics only).
The Airflow worker needs tierflow installed (plus apache-beam[gcp] for
Dataflow). To launch the Flex Template instead, call
deploy/dataflow/run-batch.sh "{{ data_interval_start }}" "{{ data_interval_end }}".

Historical days: ``airflow dags backfill -s 2026-11-01 -e 2026-11-20 tierflow_backfill``
(Airflow 2) or ``airflow backfill create --dag-id tierflow_backfill --from-date ...
--to-date ...`` (Airflow 3).
Not run here (Airflow is not installed in the environment this was written
in); tests/test_deploy_files.py checks that the file compiles and that the
rendered command is accepted by tierflow's launcher.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow import DAG
from airflow.models import Variable

try:  # Airflow 3 (standard provider)
  from airflow.providers.standard.operators.bash import BashOperator
  from airflow.providers.standard.sensors.time_delta import TimeDeltaSensor
except ImportError:  # Airflow 2
  from airflow.operators.bash import BashOperator
  from airflow.sensors.time_delta import TimeDeltaSensor

PIPELINE = "passthrough"
# How long after midnight (UTC) to wait for late records before reading a day.
GRACE = timedelta(minutes=30)

BACKFILL_COMMAND = (
    "tierflow run {{ params.pipeline }}"
    " --bootstrap-servers '{{ var.value.get(\"tierflow_bootstrap_servers\", \"kafka:9092\") }}'"
    " --topic '{{ var.value.get(\"tierflow_topic\", \"tickets\") }}'"
    " --output '{{ var.value.get(\"tierflow_output\","
    " \"gs://CHANGE-ME/tierflow/tickets-backfill\") }}'"
    " --start-time '{{ data_interval_start }}'"
    " --end-time '{{ data_interval_end }}'"
    " --commit-offsets never"
    " {{ var.value.get(\"tierflow_runner_args\", \"\") }}"
)

with DAG(
    dag_id="tierflow_backfill",
    description="Nightly tierflow backfill: one day of a Kafka topic to Parquet",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params={"pipeline": PIPELINE},
    default_args={
        "retries": 2,  # safe: a re-run of the same interval replaces its files
        "retry_delay": timedelta(minutes=10),
    },
    tags=["tierflow", "kafka", "backfill"],
) as dag:
  wait_for_late_records = TimeDeltaSensor(
      task_id="wait_for_late_records",
      delta=GRACE,
      mode="reschedule",
  )
  backfill = BashOperator(
      task_id="backfill",
      bash_command=BACKFILL_COMMAND,
      execution_timeout=timedelta(hours=6),
  )
  wait_for_late_records >> backfill
