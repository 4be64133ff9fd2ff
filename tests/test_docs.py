"""The documentation site builds with `mkdocs build --strict` (broken links between pages fail it), and every repository
file the README or a docs page names exists (stale pointers fail here)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", REPO / "sweeps" / "README.md", *sorted((REPO / "docs").glob("*.md")),
         *sorted((REPO / "experiments").glob("**/*.md"))]
TOP = ("gisp/", "conf/", "tests/", "experiments/", "docs/", "notebooks/", "sweeps/", ".ci/")


def named_files(text: str) -> set[str]:
    """Repository paths in code spans and markdown links (placeholders like <run>, globs and elisions skipped)."""
    spans = re.findall(r"`([^`\s]+)`", text) + re.findall(r"\]\(([^)\s#]+)", text)
    out = set()
    for span in spans:
        path = span.split("::")[0].split(":")[0].rstrip(".,;)")
        if path.startswith(TOP) and not any(c in path for c in "<>*{}$") and "..." not in path:
            out.add(path)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_named_file_exists(page):
    missing = [path for path in sorted(named_files(page.read_text()))
               if not ((REPO / path).exists() or (page.parent / path).exists())]
    assert not missing, f"{page.relative_to(REPO)} names files that do not exist: {missing}"


@pytest.mark.e2e
def test_the_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(REPO / ".venv" / "bin")) or shutil.which("mkdocs")
    argv = [mkdocs] if mkdocs else [sys.executable, "-m", "mkdocs"]
    proc = subprocess.run([*argv, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False,
                          env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "record_metrics" in api and "evaluate_levels" in api  # the API reference rendered from the docstrings
