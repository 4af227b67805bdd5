"""Run one example DAG under ``dag.test()`` against the Bedrock stand-in and moto's S3 (both started by the
calling test, reached through ``AIRFLOW_CONN_AWS_DEFAULT``); print a JSON summary as the last line.

Run in a fresh interpreter by tests/integration/test_bedrock_dags.py, with its own ``AIRFLOW_HOME``.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def main(config: dict[str, Any]) -> dict[str, Any]:
    from airflow.utils import db

    from airflow_provider_synth.testing.dags import dag_bag

    db.initdb()
    bag = dag_bag(dag_folder=config["dag_file"])
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags[config["dag_id"]]
    dag_run = dag.test()
    tis = {ti.task_id: {"state": str(ti.state), "try_number": ti.try_number,
                        "xcom": ti.xcom_pull(task_ids=ti.task_id)} for ti in dag_run.get_task_instances()}
    return {"state": str(dag_run.state), "run_id": dag_run.run_id, "tasks": tis}


if __name__ == "__main__":
    print("\n" + json.dumps(main(json.loads(sys.argv[1])), default=str))
