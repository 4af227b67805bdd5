"""Load DAGs from the configured dags folder, on every supported Airflow version.

``DagBag`` and ``sync_bag_to_db`` moved from ``airflow.models.dagbag`` to ``airflow.dag_processing.dagbag`` in
Airflow 3.2 (the old path still works there, with a deprecation warning).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def dag_bag(**kwargs: Any) -> Any:
    """Parse the dags folder into a ``DagBag`` (keyword arguments go to ``DagBag``)."""
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow < 3.2
        from airflow.models.dagbag import DagBag  # type: ignore[no-redef]
    return DagBag(**kwargs)


def sync_to_db(bag: Any) -> None:
    """Write the DAGs of ``bag`` (parsed from a configured bundle's folder) to the metadata database, as the DAG
    processor does after every parse (``airflow dags reserialize`` does the same for every bundle).

    ``dag.test()`` before Airflow 3.3 writes a DAG only when it has never been written: a DAG changed since then
    (e.g. an outlet asset whose URI comes from the environment) runs against the old one's database rows, and
    its new asset is never registered, so its events are dropped. Airflow 3.3 re-writes the bundle on every call
    (apache/airflow#66205); see docs/native.md, "Testing asset DAGs with dag.test() on Airflow 3.1 and 3.2".
    """
    from airflow.dag_processing.bundles.manager import DagBundlesManager

    try:
        from airflow.dag_processing.dagbag import sync_bag_to_db
    except ImportError:  # Airflow < 3.2
        from airflow.models.dagbag import sync_bag_to_db  # type: ignore[no-redef]
    manager = DagBundlesManager()  # type: ignore[no-untyped-call]
    manager.sync_bundles_to_db()
    folder = Path(bag.dag_folder).resolve()
    bundles = [b for b in manager.get_all_dag_bundles() if Path(b.path).resolve() == folder]
    assert bundles, f"no DAG bundle configured for {folder}"
    sync_bag_to_db(bag, bundles[0].name, bundles[0].version)  # as dag.test() does


def load_dag(dag_id: str) -> Any:
    """The DAG ``dag_id`` from the dags folder, written to the metadata database with the folder's other DAGs
    (:func:`sync_to_db`), so that ``dag.test()`` runs it as parsed now; fails when any DAG file has an import
    error."""
    from airflow.configuration import conf

    folder = conf.get("core", "dags_folder")
    bag = dag_bag(dag_folder=folder, bundle_path=Path(folder))
    assert not bag.import_errors, bag.import_errors
    dag = bag.get_dag(dag_id)
    assert dag is not None, f"no DAG {dag_id!r} in {bag.dag_folder}"
    sync_to_db(bag)
    return dag
