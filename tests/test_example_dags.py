"""Every example DAG parses without import errors (unit run); the integration tests run them."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "example_dags").glob("*.py")
                  if not p.name.startswith("_"))


@pytest.fixture(scope="module")
def dagbag():
    from airflow_provider_synth.testing.dags import dag_bag

    return dag_bag()


def test_no_import_errors(dagbag) -> None:
    assert not dagbag.import_errors, dagbag.import_errors


@pytest.mark.parametrize("module", EXAMPLES)
def test_each_example_file_defines_a_dag(dagbag, module: str) -> None:
    files = {Path(d.fileloc).stem for d in dagbag.dags.values()}
    assert module in files


def test_example_snippet_markers_are_paired() -> None:
    root = Path(__file__).resolve().parent.parent / "example_dags"
    for path in root.glob("*.py"):
        text = path.read_text()
        starts = {line.split("[START ")[1].rstrip("]").strip() for line in text.splitlines() if "[START " in line}
        ends = {line.split("[END ")[1].rstrip("]").strip() for line in text.splitlines() if "[END " in line}
        assert starts == ends, path


@pytest.mark.parametrize("module", EXAMPLES)
def test_example_uses_no_deprecated_argument(module: str) -> None:
    """The examples show the current arguments: building their DAG warns nothing of this provider's."""
    import runpy
    import warnings

    path = Path(__file__).resolve().parent.parent / "example_dags" / f"{module}.py"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        runpy.run_path(str(path), run_name=f"example_{module}")
    ours = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)
            and ("airflow_provider_synth" in w.filename or " is deprecated: " in str(w.message))]
    assert not ours, ours
