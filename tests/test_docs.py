"""Design documents: every *.md file a docstring or comment in src/ cites exists in the repository, and the links
between the documents (docs/, README.md) resolve."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
DOCS = REPO / "docs"
# A cited document: a path or name ending in .md (`docs/protocol.md`, `HYLORADA.md`), not part of a longer token.
CITATION = re.compile(r"(?<![\w./<>-])((?:[\w.-]+/)*[\w-]+\.md)\b")
# Files a run writes, which docstrings name but which are not documents of the repository.
RUN_OUTPUTS = {"report.md"}
DESIGN_DOCUMENTS = ("architecture.md", "protocol.md", "studies.md", "hylorada.md", "latentwire.md", "mu.md",
                    "reading-a-report.md")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def python_texts(source: str) -> Iterator[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python source."""
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring is not None:
                yield node.body[0].lineno, docstring


def c_texts(source: str) -> Iterator[tuple[int, str]]:
    """(line, text) of every comment of a C source."""
    for match in re.finditer(r"/\*.*?\*/|//[^\n]*", source, flags=re.S):
        yield source.count("\n", 0, match.start()) + 1, match.group()


def missing_citations(files: list[Path], repo: Path = REPO) -> list[str]:
    """`file:line cites NAME` for each .md citation in the files' comments and docstrings that exists neither under
    `repo` nor beside the citing file."""
    missing = []
    for path in files:
        source = path.read_text(encoding="utf-8")
        texts = python_texts(source) if path.suffix == ".py" else c_texts(source)
        for line, text in texts:
            for name in CITATION.findall(text):
                if name in RUN_OUTPUTS or (repo / name).is_file() or (path.parent / name).is_file():
                    continue
                missing.append(f"{path.relative_to(repo)}:{line} cites {name}")
    return missing


def source_files() -> list[Path]:
    return sorted(p for p in SRC.rglob("*") if p.suffix in (".py", ".c", ".h"))


def test_every_document_cited_in_src_exists():
    missing = missing_citations(source_files())
    assert not missing, "documents cited in src/ that are not in the repository:\n" + "\n".join(missing)


def test_src_cites_each_design_document():
    """The scan finds the citations (a regex that matched nothing would pass the test above vacuously)."""
    cited = set()
    for path in source_files():
        source = path.read_text(encoding="utf-8")
        for _, text in python_texts(source) if path.suffix == ".py" else c_texts(source):
            cited.update(CITATION.findall(text))
    for name in ("architecture.md", "protocol.md", "hylorada.md", "latentwire.md", "mu.md"):
        assert f"docs/{name}" in cited


def test_a_citation_of_a_missing_document_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "protocol.md").write_text("# protocol\n")
    module = tmp_path / "module.py"
    module.write_text('"""Perplexity (docs/protocol.md section 4; see also PROTOCOL.md)."""\n\n'
                      "X = 'HYLORADA.md in a string is not a citation'  # the rules: docs/hylorada.md\n"
                      "def f():\n    \"\"\"Writes report.md and cites docs/mu.md.\"\"\"\n")
    kernel = tmp_path / "kernel.c"
    kernel.write_text("/* Built as ENGINE.md says. */\nint x; // docs/protocol.md\n")
    assert missing_citations([module, kernel], repo=tmp_path) == [
        "module.py:3 cites docs/hylorada.md", "module.py:1 cites PROTOCOL.md", "module.py:5 cites docs/mu.md",
        "kernel.c:1 cites ENGINE.md"]


def test_design_documents_exist_and_their_links_resolve():
    pages = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
    for name in DESIGN_DOCUMENTS:
        assert (DOCS / name).is_file(), f"docs/{name} is missing"
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(REPO)} links to {target}")
    assert not broken, "\n".join(broken)


def test_readme_lists_the_design_documents():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in DESIGN_DOCUMENTS:
        assert f"docs/{name}" in readme


def test_a_report_links_to_the_guide_to_reading_it(tmp_path):
    """report.md's first paragraph links to docs/reading-a-report.md, relative to wherever the run directory lies."""
    from lmlab.studies.report import guide_link
    from lmlab.studies.rundir import RunDir

    for root in (tmp_path / "runs" / "hylorada-1", REPO / "runs" / "x"):
        link = guide_link(RunDir(root))
        target = LINK.fullmatch(link).group(1)
        assert link.startswith("[docs/reading-a-report.md](")
        assert (root / target).resolve() == (DOCS / "reading-a-report.md").resolve()
