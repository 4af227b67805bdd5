"""Sphinx configuration: ``make docs`` builds docs/ (MyST Markdown) into docs/_build/html, warnings as errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the checkout's package, not an installed copy, is what the reference documents
sys.path.insert(0, str(ROOT))
# autodoc imports the operators, and so Airflow: keep its home (airflow.cfg, the SQLite file) out of ~
os.environ.setdefault("AIRFLOW_HOME", str(ROOT / ".airflow"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

project = "airflow-provider-synth"
author = "airflow-provider-synth contributors"
copyright = "2026, airflow-provider-synth contributors"
release = "0.1.0"

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# "[outcomes](#outcomes)" links point at headings: give headings down to ### their slug as an anchor
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": False}

html_theme = "alabaster"
html_title = "airflow-provider-synth"
