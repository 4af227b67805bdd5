"""Every ``python`` code block in docs/ and README.md runs, as written.

A block runs alone, in a fresh namespace, in a temporary working directory. An HTML comment on the line just
before the fence (invisible on GitHub and in the built site) changes that; see docs/writing_docs.md:

* ``<!-- snippet: fixtures=manifest,QuizItem -->``: the block gets these pytest fixtures as names (a block that
  needs a real service or a finished run: ``batch_server`` is a started local Batch API server, ``manifest`` the
  XCom of a finished ``example_openai_structured`` run against one, and so on below);
* ``<!-- snippet: continue -->``: the block runs in the namespace the previous block of the page left;
* ``<!-- snippet: skip=<why> -->``: the block is compiled (a syntax error fails) but not run; say why.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[^\s`]*)[^\n]*\n(?P<code>.*?)^(?P=indent)```", re.S | re.M)
MARKER = re.compile(r"<!--\s*snippet:\s*(?P<spec>.*?)\s*-->\s*$")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)]


def blocks(page: Path) -> Iterator[tuple[int, str, dict[str, str]]]:
    """``(line, code, marker)`` of each python block of ``page``."""
    text = page.read_text()
    for m in FENCE.finditer(text):
        if m.group("lang") not in ("python", "py"):
            continue
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        spec: dict[str, str] = {}
        for part in (marker.group("spec").split(";") if marker else ()):
            key, _, value = part.strip().partition("=")
            spec[key.strip()] = value.strip()
        indent = len(m.group("indent"))
        code = "\n".join(x[indent:] for x in m.group("code").splitlines())
        yield line, code, spec


def snippet_params() -> list[Any]:
    out = []
    for page in pages():
        for line, code, spec in blocks(page):
            name = page.relative_to(ROOT).as_posix()
            out.append(pytest.param(page, line, code, spec, id=f"{name}:{line}"))
    return out


#: the namespace each page's last block left, for a "continue" block
_namespaces: dict[Path, dict[str, Any]] = {}


@pytest.mark.parametrize("page,line,code,spec", snippet_params())
def test_snippet_runs_as_written(page: Path, line: int, code: str, spec: dict[str, str],
                                 request: pytest.FixtureRequest, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    unknown = set(spec) - {"fixtures", "continue", "skip"}
    assert not unknown, f"{page.name}:{line}: unknown snippet marker keys {sorted(unknown)}"
    compiled = compile(code, f"{page.relative_to(ROOT)}:{line}", "exec")
    if "skip" in spec:
        assert spec["skip"], f"{page.name}:{line}: say why the block is not run (skip=<why>)"
        pytest.skip(spec["skip"])
    if "continue" in spec:
        assert page in _namespaces, f"{page.name}:{line}: 'continue' but no block ran before it on the page"
        namespace = _namespaces[page]
    else:
        namespace = {"__name__": "__snippet__"}
    for name in filter(None, (n.strip() for n in spec.get("fixtures", "").split(","))):
        namespace[name] = request.getfixturevalue(name)
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        exec(compiled, namespace)
    _namespaces[page] = namespace
    ours = [str(w.message) for w in caught if ours_deprecated(w)]
    assert not ours, f"{page.name}:{line}: the snippet uses deprecated arguments: {ours}"


def ours_deprecated(w: warnings.WarningMessage) -> bool:
    """A ``DeprecationWarning`` of this provider (its old argument names): no doc example may show one."""
    text = str(w.message)
    return issubclass(w.category, DeprecationWarning) and (
        "airflow_provider_synth" in w.filename or " is deprecated: pass " in text or " is deprecated: use " in text)


def test_snippets_are_found() -> None:
    found = snippet_params()
    assert len(found) >= 9
    assert any(p.values[0].name == "testing_server.md" for p in found)


# ---- what a marked block may ask for -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def _server() -> Iterator[Any]:
    from airflow_provider_synth.server.server import BatchServer, ServerConfig
    from airflow_provider_synth.testing.pytest_plugin import FAST

    with BatchServer(ServerConfig().replace(**FAST)) as srv:
        yield srv


@pytest.fixture(scope="module")
def _example_run(airflow_db: str, _server: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Run an example DAG (``dag.test()``) against the local server; return its task's manifest."""
    out = tmp_path_factory.mktemp("snippet-runs")
    conn = json.dumps({"conn_type": "synth_openai", "password": "sk-test", "host": _server.base_url})
    runs: dict[str, dict[str, Any]] = {}

    def run(dag_id: str, task_id: str, conf: dict[str, Any]) -> dict[str, Any]:
        from airflow_provider_synth.testing.dags import load_dag

        if dag_id not in runs:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT", conn)
                mp.setenv("SYNTH_OUTPUT_DIR", str(out))
                dag = load_dag(dag_id)
                dag.get_task(task_id).poll_interval = 0.2
                dr = dag.test(run_conf=conf)
                assert dr.state == "success", f"{dag_id} did not succeed"
                runs[dag_id] = dr.get_task_instance(task_id).xcom_pull(task_ids=task_id)
        return runs[dag_id]

    return run


@pytest.fixture
def manifest(_example_run: Any) -> dict[str, Any]:
    """The XCom (manifest) of a finished ``example_openai_structured`` run: 12 quiz items, quiz-000000..11."""
    return dict(_example_run("example_openai_structured", "synthesize", {"n_records": 12}))


@pytest.fixture
def embeddings_manifest(_example_run: Any) -> dict[str, Any]:
    """The manifest of a finished ``example_openai_embeddings`` run: doc-00000..doc-00011."""
    return dict(_example_run("example_openai_embeddings", "embed", {"n_docs": 12}))


@pytest.fixture
def requests_path(manifest: dict[str, Any]) -> str:
    """The request lines the ``manifest`` run built from its records (its ``input_path`` otherwise)."""
    return manifest["work_dir"] + "/requests.jsonl"


@pytest.fixture
def QuizItem() -> type:  # noqa: N802 - the name the docs use
    # loaded from its file: the repository root is not on sys.path under `pytest` (only `python -m pytest`)
    import importlib.util

    spec = importlib.util.spec_from_file_location("synth_doc_example_structured",
                                                  ROOT / "example_dags" / "example_openai_structured.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model: type = module.QuizItem
    return model
