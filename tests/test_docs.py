"""The documentation: the reference pages written from the code are current, the site builds with
no warning (a broken link fails it), every module is in the design's table, and the README stays
what a newcomer reads first, pointing at pages that exist."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_reference_pages_are_written_from_the_code_as_it_is():
    result = subprocess.run([sys.executable, "scripts/docs_reference.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    if shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    mkdocs = str(Path(sys.executable).parent / "mkdocs")
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "terms" / "index.html").is_file()


def test_the_design_page_names_every_module():
    from test_layout import modules

    table = (ROOT / "docs" / "design.md").read_text()
    named = set(re.findall(r"^\| `([\w.]+)` \|", table, flags=re.M))
    packages_only = {m for m in modules() if (ROOT / m.replace(".", "/") / "__init__.py").exists()
                     and m not in ("generators",)}
    missing = sorted(m for m in modules() if m not in named and m not in packages_only and m != "dfkd.__main__")
    assert missing == [], f"docs/design.md does not name {missing}"


def test_the_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 260
    for target in re.findall(r"\]\((?!https?://)([^)#]+)", readme):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
