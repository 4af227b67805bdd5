"""Load DAGs from the configured dags folder, on every supported Airflow version.

``DagBag`` moved from ``airflow.models.dagbag`` to ``airflow.dag_processing.dagbag`` in Airflow 3.2 (the old
path still works there, with a deprecation warning).
"""

from __future__ import annotations

from typing import Any


def dag_bag(**kwargs: Any) -> Any:
    """Parse the dags folder into a ``DagBag`` (keyword arguments go to ``DagBag``)."""
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow < 3.2
        from airflow.models.dagbag import DagBag  # type: ignore[no-redef]
    return DagBag(**kwargs)


def load_dag(dag_id: str) -> Any:
    """The DAG ``dag_id`` from the dags folder; fails when any DAG file has an import error."""
    bag = dag_bag()
    assert not bag.import_errors, bag.import_errors
    dag = bag.get_dag(dag_id)
    assert dag is not None, f"no DAG {dag_id!r} in {bag.dag_folder}"
    return dag
