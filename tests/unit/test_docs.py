"""The docs are checked like code: the README stays short and keeps its two commands, the
configuration reference equals what docs/gen_config_reference.py generates from the config
classes, every environment variable the packages read is documented, the README's links resolve,
and the mkdocs site builds with --strict (a broken link, a missing anchor or a page left out of
the nav fails). The runnable code blocks run in tests/integration/test_doc_examples.py."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = ROOT / "docs" / "pages"
PACKAGES = ("ai_query", "spark_udfs", "batch_runner", "gpu_workers")


def test_readme_is_short_and_keeps_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 220, "README.md is over 220 lines: move the detail into a docs/pages/ page"
    for needed in ("make demo", "make test", "## Install into your own environment", "```mermaid"):
        assert needed in text, f"README.md lost {needed!r}"


def test_configuration_reference_is_generated_from_the_config_classes():
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_config_reference.py"), "--check"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_every_environment_variable_read_is_documented():
    read = set()
    pattern = re.compile(r"""(?:environ(?:\.get|\.setdefault|\.pop)?\(\s*|environ\[\s*|getenv\(\s*)["']([A-Z][A-Z0-9_]+)["']""")
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            read.update(pattern.findall(path.read_text()))
    read.update(re.findall(r"""["'](AIQ_[A-Z0-9_]*[A-Z0-9])["']""", "".join(
        p.read_text() for package in PACKAGES for p in (ROOT / package).rglob("*.py"))))
    assert {"AIQ_SERVING_URL", "AIQ_SPARK_MASTER", "AIQ_CACHE_DIR"} <= read  # the scan finds what it must
    page = (PAGES / "environment.md").read_text()
    missing = sorted(name for name in read if f"`{name}" not in page)
    assert missing == [], f"read in the code but not in docs/pages/environment.md: {missing}"


def test_readme_links_resolve():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local, "the README links no docs page"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert missing == [], f"README.md links to missing files: {missing}"


def test_docs_pages_live_under_docs_pages():
    stray = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert stray == [], (f"docs/{stray[0]} is outside the site: move it to docs/pages/ and add it to the nav "
                         "in docs/mkdocs.yml")


def test_mkdocs_builds_strict(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "docs" / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").exists()
