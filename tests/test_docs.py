"""The repository's documents stand on their own.

Code, tests, configs, scripts and docs cite only documents inside the repository: no project-private
spec folder, no section number after the bare word "spec", no stack notes other than `docs/stack.md`;
every section of `docs/algorithms.md` they cite (``docs/algorithms.md §4.1``, ``§3 step 4``,
``§3 steps 3-6``) is a heading there; and every test its §9 table names exists. The patterns and the
examples below are assembled (the section sign is `SS`) so that this file does not match them itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ROOT / "docs" / "algorithms.md"
SCANNED_DIRS = ("trainer", "sct_sweeps", "dashboards", "bench", "tests", "experiments", "scripts", "docs")
SCANNED_FILES = ("README.md", "Makefile", "pyproject.toml")
SS = chr(0xA7)  # the section sign
BINARY_SUFFIXES = {".pt", ".png", ".jpg", ".gz", ".npz", ".pyc", ".sha256", ".parquet", ".db"}

# A reference to a document that is not in the repository.
OUTSIDE = re.compile(
    "|".join([
        "shared" + r"/+spec",  # the private spec folder
        "spec" + r"\s*§",  # the word spec, then a section number: which document?
        r"(?<!docs/)\bstack" + r"\.md",  # stack notes other than docs/stack.md
    ]),
    re.IGNORECASE,
)
# README and docs/ name no path outside the repository (tests may read ../shared/fixtures).
OUTSIDE_PATH = re.compile(r"\.\./" + "shared|/work/" + "shared")
# A document name, or a section reference with optional step numbers: §3, §4.1, §3 step 4, §3 steps 3-6.
TOKEN = re.compile(
    r"(?P<doc>[\w./-]+\.md)\b"
    r"|§(?P<sec>\d+(?:\.\d+)?)(?:\s+steps?\s+(?P<lo>\d+)(?:\s*[-–]\s*(?P<hi>\d+))?)?"
)
SECTION_HEADING = re.compile(r"^#{2,4} §(\d+(?:\.\d+)?)\s")
STEP_HEADING = re.compile(r"^#{3,4} Step (\d+)\b")


def scanned_files() -> list[Path]:
    """Every text file the guard covers."""
    files = [ROOT / f for f in SCANNED_FILES if (ROOT / f).is_file()]
    for d in SCANNED_DIRS:
        for p in sorted((ROOT / d).rglob("*")):
            if p.is_file() and p.suffix not in BINARY_SUFFIXES and "__pycache__" not in p.parts:
                files.append(p)
    return files


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def algorithm_sections(text: str) -> tuple[set[str], dict[str, set[int]]]:
    """Section ids of docs/algorithms.md ('3', '4.1', ...) and the step numbers under each top section."""
    sections: set[str] = set()
    steps: dict[str, set[int]] = {}
    current = ""
    for line in text.splitlines():
        if m := SECTION_HEADING.match(line):
            sections.add(m.group(1))
            if line.startswith("## "):
                current = m.group(1)
        elif (m := STEP_HEADING.match(line)) and current:
            steps.setdefault(current, set()).add(int(m.group(1)))
    return sections, steps


def algorithm_refs(text: str, default_algorithms: bool) -> list[tuple[int, str, int | None, int | None]]:
    """(line, section, first step, last step) of every reference to docs/algorithms.md in `text`.

    A § belongs to the last document named before it on its line; with none named, to
    docs/algorithms.md where `default_algorithms` (code, whose only other § citations name
    docs/benchmarks.md) and to nothing otherwise (a document's own sections).
    """
    refs = []
    for n, line in enumerate(text.splitlines(), 1):
        doc = "algorithms.md" if default_algorithms else None
        for m in TOKEN.finditer(line):
            if m.group("doc"):
                doc = m.group("doc")
            elif doc is not None and doc.endswith("algorithms.md"):
                lo = int(m.group("lo")) if m.group("lo") else None
                hi = int(m.group("hi")) if m.group("hi") else lo
                refs.append((n, m.group("sec"), lo, hi))
    return refs


def bad_refs(text: str, sections: set[str], steps: dict[str, set[int]], default_algorithms: bool) -> list[str]:
    """The references in `text` that name no heading of docs/algorithms.md."""
    bad = []
    for n, sec, lo, hi in algorithm_refs(text, default_algorithms):
        if sec not in sections:
            bad.append(f"line {n}: §{sec}")
        elif lo is not None and hi is not None:
            missing = set(range(lo, hi + 1)) - steps.get(sec, set())
            if missing:
                bad.append(f"line {n}: §{sec} step(s) {sorted(missing)}")
    return bad


def _defaults_to_algorithms(path: Path) -> bool:
    rel = path.relative_to(ROOT)
    if rel.as_posix() in ("docs/architecture.md", "docs/algorithms.md"):
        return True  # the module table cites algorithms sections by number; algorithms.md's own cross-references
    return rel.parts[0] != "docs" and rel.name != "README.md"


def test_algorithms_keeps_the_cited_numbering() -> None:
    sections, steps = algorithm_sections(ALGORITHMS.read_text(encoding="utf-8"))
    want = {"1", "2", "3", "4", "4.1", "4.2", "4.3", "4.4", "4.5", "5", "6", "7", "8", "9"}
    assert want <= sections, f"docs/algorithms.md lacks sections {sorted(want - sections)}"
    assert steps.get("3") == set(range(1, 8)), f"§3 must have steps 1-7, has {sorted(steps.get('3', ()))}"


def test_no_reference_to_documents_outside_the_repository() -> None:
    offenders = []
    for path in scanned_files():
        text = read_text(path)
        if text is None:
            continue
        rel = path.relative_to(ROOT).as_posix()
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line) or (
                (rel == "README.md" or rel.startswith("docs/")) and OUTSIDE_PATH.search(line)
            ):
                offenders.append(f"{rel}:{n}: {line.strip()[:100]}")
    assert not offenders, "cite docs/algorithms.md or docs/stack.md instead:\n" + "\n".join(offenders)


def test_every_algorithms_reference_names_a_heading() -> None:
    sections, steps = algorithm_sections(ALGORITHMS.read_text(encoding="utf-8"))
    checked, offenders = 0, []
    for path in scanned_files():
        text = read_text(path)
        if text is None:
            continue
        default = _defaults_to_algorithms(path)
        checked += len(algorithm_refs(text, default))
        offenders += [f"{path.relative_to(ROOT)} {b}" for b in bad_refs(text, sections, steps, default)]
    assert not offenders, "no such heading in docs/algorithms.md:\n" + "\n".join(offenders)
    assert checked >= 50, f"only {checked} references found: the scanner is not seeing the code's citations"


def test_tests_named_in_section_9_exist() -> None:
    """Every `test_x.py::test_name` (or `::test_name` after a named file) in the §9 table is a test function."""
    text = ALGORITHMS.read_text(encoding="utf-8")
    table = text[text.index(f"## {SS}9 "):text.index(f"## {SS}10 ")]
    named, missing = 0, []
    for row in (r for r in table.splitlines() if r.startswith("|")):
        current = None
        for m in re.finditer(r"`(test_\w+\.py)?(?:::(\w+))?`", row):
            current = m.group(1) or current
            if current is None or not (ROOT / "tests" / current).is_file():
                missing.append(f"{current}: no such test file")
                continue
            if m.group(2):
                named += 1
                src = (ROOT / "tests" / current).read_text(encoding="utf-8")
                if not re.search(rf"^def {m.group(2)}\(", src, re.MULTILINE):
                    missing.append(f"{current}::{m.group(2)}")
    assert not missing, "docs/algorithms.md §9 names tests that do not exist:\n" + "\n".join(missing)
    assert named >= 60, f"only {named} tests named in §9"


@pytest.mark.parametrize(
    ("line", "flagged"),
    [
        (f"# ECT mapping (spec {SS}3 step 2)", True),
        (f"Defaults follow ../shared/{'spec'}/algorithms.md.", True),
        (f"keep Ray on loopback ({'stack'}.md)", True),
        (f"keep Ray on loopback (docs/{'stack'}.md)", False),
        (f"see docs/algorithms.md {SS}3 step 2", False),
    ],
    ids=["bare-spec-section", "spec-folder", "bare-stack-notes", "docs-stack", "algorithms-section"],
)
def test_outside_pattern_catches_what_it_should(line: str, flagged: bool) -> None:
    assert bool(OUTSIDE.search(line)) is flagged


def test_reference_checker_rejects_missing_sections_and_steps() -> None:
    doc = f"## {SS}3 ECT\n### Step 1: t\n### Step 2: r\n### {SS}3.1 sub\n## {SS}4 SCT\n"
    sections, steps = algorithm_sections(doc)
    assert sections == {"3", "3.1", "4"} and steps == {"3": {1, 2}}
    ok = f"(docs/algorithms.md {SS}3 steps 1-2, {SS}3.1, {SS}4) and docs/benchmarks.md {SS}9"
    assert bad_refs(ok, sections, steps, default_algorithms=False) == []
    assert bad_refs(f"docs/algorithms.md {SS}5", sections, steps, default_algorithms=False) == [f"line 1: {SS}5"]
    got = bad_refs(f"(docs/algorithms.md {SS}3 step 4)", sections, steps, default_algorithms=False)
    assert got == [f"line 1: {SS}3 step(s) [4]"]
    assert bad_refs(f"# x ({SS}4.2)", sections, steps, default_algorithms=True) == [f"line 1: {SS}4.2"]
    assert bad_refs(f"# x ({SS}4.2)", sections, steps, default_algorithms=False) == []
