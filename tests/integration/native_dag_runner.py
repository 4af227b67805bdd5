"""Run example DAGs under ``dag.test()`` with OpenLineage (file transport) and StatsD metrics switched on; write
a JSON summary to ``summary_path`` (stdout also carries task logs, some written from other threads).

Run in a fresh interpreter by tests/integration/test_native_observability.py: Airflow reads the
``[openlineage]`` and ``[metrics]`` settings (environment variables set by the caller) when first imported, and
loads the OpenLineage listener once per process. It starts the local Batch API server and a StatsD listener
(UDP), both on 127.0.0.1 with random ports.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from typing import Any


class StatsdListener:
    """Collects the StatsD packets sent to a UDP port on 127.0.0.1."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            data = self.sock.recv(65535)
            if data == b"__stop__":
                return
            self.lines.extend(data.decode().splitlines())

    def stop(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"__stop__", ("127.0.0.1", self.port))
        self._thread.join(5)


def main(config: dict[str, Any], statsd: StatsdListener) -> dict[str, Any]:
    from airflow.utils import db

    from airflow_provider_synth.server.server import BatchServer, ServerConfig
    from airflow_provider_synth.testing.dags import dag_bag
    from airflow_provider_synth.testing.pytest_plugin import FAST

    db.initdb()
    server = BatchServer(ServerConfig().replace(**FAST)).start()
    try:
        os.environ["AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT"] = json.dumps(
            {"conn_type": "synth_openai", "password": "sk-test", "host": server.base_url})
        bag = dag_bag()
        assert not bag.import_errors, bag.import_errors
        runs = {}
        for dag_id, run_conf in config["dags"].items():
            dag = bag.get_dag(dag_id)
            for task in dag.tasks:
                if hasattr(task, "poll_interval"):
                    task.poll_interval = 0.2
            dr = dag.test(run_conf=run_conf)
            runs[dag_id] = {"state": str(dr.state), "run_id": dr.run_id,
                            "xcoms": {ti.task_id: ti.xcom_pull(task_ids=ti.task_id)
                                      for ti in dr.get_task_instances()}}
    finally:
        server.stop()
    return {"runs": runs}


if __name__ == "__main__":
    listener = StatsdListener()
    os.environ["AIRFLOW__METRICS__STATSD_ON"] = "True"
    os.environ["AIRFLOW__METRICS__STATSD_HOST"] = "127.0.0.1"
    os.environ["AIRFLOW__METRICS__STATSD_PORT"] = str(listener.port)
    config = json.loads(sys.argv[1])
    summary = main(config, listener)
    listener.stop()
    summary["statsd"] = listener.lines
    with open(config["summary_path"], "w") as fp:
        json.dump(summary, fp, default=str)
