"""The docs site builds (Sphinx + MyST, warnings as errors), and what it renders is what a reader needs: the
example DAGs' code where the ``literalinclude`` directives stand, and a reference for the public API.

``make test`` builds the site once (``make docs``) and points ``SYNTH_DOCS_HTML`` at it; run alone, the test
builds it into a temporary folder with the same options.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# at a line's start: not the indented example of the directive in writing_docs.md
INCLUDE = re.compile(r"^```\{literalinclude\}\s+(\S+)\s*\n(.*?)```", re.S | re.M)
#: the options `make docs` passes (Makefile: SPHINXOPTS)
SPHINX_OPTIONS = ["-W", "--keep-going", "-q", "-b", "html"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built = os.environ.get("SYNTH_DOCS_HTML")
    if built:
        return Path(built)
    out = tmp_path_factory.mktemp("docs-html")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "sphinx", *SPHINX_OPTIONS, str(DOCS), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def page_text(site: Path, page: Path) -> str:
    """The rendered page's text: tags dropped, entities decoded, whitespace folded."""
    raw = (site / page.relative_to(DOCS).with_suffix(".html")).read_text()
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", raw)).split())


def included_code(page: Path, target: str, options: str) -> str:
    text = (page.parent / target).resolve().read_text()
    start = re.search(r":start-after:\s*\"?([^\"\n]+)\"?", options)
    end = re.search(r":end-before:\s*\"?([^\"\n]+)\"?", options)
    if start:
        text = text.split(start.group(1), 1)[1].split("\n", 1)[1]
    if end:
        text = text.split(end.group(1), 1)[0].rsplit("\n", 1)[0]
    return " ".join(text.split())


def includes() -> list[tuple[Path, str, str]]:
    return [(page, m.group(1), m.group(2)) for page in sorted(DOCS.rglob("*.md"))
            for m in INCLUDE.finditer(page.read_text())]


def test_every_literalinclude_renders_its_code(site: Path) -> None:
    found = includes()
    assert len(found) >= 18
    for page, target, options in found:
        code = included_code(page, target, options)
        assert len(code) > 40, f"{page.name}: {target} includes almost nothing"
        text = page_text(site, page)
        assert code in text, f"{page.name}: the code of {target} ({options.split()[3:4]}) is not in the page"
        assert "{literalinclude}" not in text, f"{page.name} shows a bare directive"


def test_every_page_is_in_the_site(site: Path) -> None:
    """New pages (the glob toctree) appear without anyone editing index.md."""
    for page in DOCS.rglob("*.md"):
        if "_build" not in page.parts:
            assert (site / page.relative_to(DOCS).with_suffix(".html")).is_file(), f"{page} was not built"
    nav = page_text(site, DOCS / "index.md")
    for name in ("OpenAI and Azure OpenAI", "API reference", "The local Batch API server"):
        assert name in nav


@pytest.mark.parametrize("name,says", [
    ("airflow_provider_synth.operators.openai_batch.RequestTemplate", "prompt_template"),
    ("airflow_provider_synth.operators.openai_batch.OpenAIBatchConfig", "retry_failed_requests"),
    ("airflow_provider_synth.batch.checks.OutputChecks", "finish_reasons"),
    ("airflow_provider_synth.batch.split.ShardLimits", "max_requests"),
    ("airflow_provider_synth.operators.vllm.VLLMEngineConfig", "tensor_parallel_size"),
    ("airflow_provider_synth.batch.extract.extract_text", "Mapping"),
    ("airflow_provider_synth.batch.extract.get_results", "custom_id"),
    ("airflow_provider_synth.batch.extract.iter_parsed", "path"),
    ("airflow_provider_synth.operators.openai_batch.OpenAIBatchOperator", "max_failed_ratio"),
])
def test_api_reference_documents_the_public_names(site: Path, name: str, says: str) -> None:
    raw = (site / "reference" / "api.html").read_text()
    m = re.search(rf'<dt class="sig[^"]*" id="{re.escape(name)}">(.*?)</dl>', raw, re.S)
    assert m, f"{name} is not in the API reference"
    assert says in html.unescape(re.sub(r"<[^>]+>", "", m.group(1)))


def test_make_docs_and_make_test_build_the_site_with_warnings_as_errors() -> None:
    """`make docs` builds with the options this test uses, and `make test` (what CI runs) builds it first."""
    import shutil

    if shutil.which("make") is None:
        pytest.skip("no make here")

    def dry_run(target: str) -> str:
        done = subprocess.run(["make", "-n", "-o", ".venv/.installed", "-o", ".venv-vllm/.installed", target],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert f"-m sphinx {' '.join(SPHINX_OPTIONS)} docs docs/_build/html" in dry_run("docs")
    commands = dry_run("test")
    assert commands.index("make docs") < commands.index("SYNTH_DOCS_HTML=") < commands.index("pytest")
    assert "docs]" in (ROOT / "Makefile").read_text().split("$(STAMP): pyproject.toml", 1)[1].split("\n\n")[0]
