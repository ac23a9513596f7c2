"""The documentation's code runs as written, and the README lists every page of the site."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(DOCS)) for page in PAGES])
def test_python_blocks_of_the_guide_run(page, tmp_path, monkeypatch):
    # the blocks of one page build on each other, as a reader runs them: one namespace per page
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs.{page.stem}"}
    for block in _python_blocks(page.read_text()):
        exec(compile(block, str(page), "exec"), namespace)


def test_the_guide_has_code_to_run():
    assert sum(len(_python_blocks(page.read_text())) for page in PAGES) >= 10


def test_readme_links_every_page_of_the_site():
    readme = (ROOT / "README.md").read_text()
    linked = {(ROOT / target).resolve() for target in re.findall(r"\]\((docs/[^)#]+)\)", readme)}
    pages = {page.resolve() for page in DOCS.rglob("*") if page.suffix in {".md", ".rst"} and page.stem != "index"}
    assert pages <= linked, f"pages missing from the README's list: {sorted(str(p.relative_to(DOCS)) for p in pages - linked)}"
    missing = sorted(str(path.relative_to(ROOT)) for path in linked if not path.exists())
    assert not missing, f"README links to pages that do not exist: {missing}"


def test_the_vocabulary_page_shows_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- vocabulary: start -->", "<!-- vocabulary: end -->"
    assert readme.index(start) > readme.index("## Vocabulary") and readme.index(end) < readme.index("## Layout")
    assert start in (DOCS / "vocabulary.md").read_text() and end in (DOCS / "vocabulary.md").read_text()


def test_pre_commit_runs_the_checks_of_ci():
    ci = (ROOT / ".ci" / "run").read_text()
    entries = re.findall(r"^\s*entry:\s*(.+)$", (ROOT / ".pre-commit-config.yaml").read_text(), flags=re.M)
    assert entries
    for entry in entries:
        assert entry.strip() in ci, entry
