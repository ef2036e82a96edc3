"""The package's citations resolve in docs/algorithms.md, the algorithms document that ships with the repository.

Docstrings and comments under llmq/ cite the document by section ("§2.3", "§2.3–2.4", "§4.4 item 2")
and by equation label ("(S3)", "R2", "B1–B3"). Every such citation must name a heading or an
equation of docs/algorithms.md, and none may point at the reference documents that do not ship
(ALGORITHMS.md, DESIGN.md).
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "llmq"
ALGORITHMS = REPO / "docs" / "algorithms.md"

UNSHIPPED_DOCUMENTS = ("ALGORITHMS.md", "DESIGN.md")
BINARY_SUFFIXES = {".pyc", ".pyo", ".so", ".pyd", ".png", ".jpg", ".safetensors", ".bin"}

# "§2", "§2.3", "§8.6.7" (item 7 of §8.6), and ranges "§2.3–2.4", "§5.4-5.5", "§2–4".
SECTION = re.compile(r"§\s*(\d+(?:\.\d+)*)(?:\s*[–—-]\s*(\d+(?:\.\d+)*))?")
# A section number of another document ("DESIGN.md §3") is not a citation of docs/algorithms.md.
OTHER_DOCUMENT_SECTION = re.compile(r"DESIGN\.md\s*§\s*[\d.]+")
# Equation labels of docs/algorithms.md: B (Bellman), E (equivalent forms), R (DPO / r→Q*), S (ShiQ);
# written "(S3)", "S3,", "R2)" or as a range "B1–B3".
LABEL = re.compile(r"(?<![\w.])([BERS])(\d{1,2})(?:\s*[–—-]\s*\1(\d{1,2}))?(?![\w.])")
HEADING = re.compile(r"^#{2,3}\s+(\d+(?:\.\d+)?)(?![\d.]*\d)")


def package_sources() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def package_text_files() -> list[Path]:
    return sorted(
        path
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in BINARY_SUFFIXES
    )


def cited_sections(text: str) -> set[str]:
    """Sections ``"N"`` or ``"N.M"`` cited in ``text``; ranges within one section are expanded, deeper levels cut to
    N.M."""
    text = OTHER_DOCUMENT_SECTION.sub("", text)
    found: set[str] = set()
    for match in SECTION.finditer(text):
        first = match.group(1).split(".")[:2]
        found.add(".".join(first))
        if match.group(2) is None:
            continue
        last = match.group(2).split(".")[:2]
        if len(first) == 2 and len(last) == 1:  # "§8.3–5" means §8.3 to §8.5
            last = [first[0], last[0]]
        if len(first) == len(last) and first[:-1] == last[:-1]:
            found.update(".".join([*first[:-1], str(n)]) for n in range(int(first[-1]), int(last[-1]) + 1))
        else:
            found.add(".".join(last))
    return found


def cited_labels(text: str) -> set[str]:
    """Equation labels (``"S3"``, ``"B2"``, …) cited in ``text``; ranges like ``B1–B3`` are expanded."""
    found: set[str] = set()
    for family, first, last in LABEL.findall(text):
        end = int(last) if last else int(first)
        found.update(f"{family}{n}" for n in range(int(first), end + 1))
    return found


def document_headings() -> set[str]:
    return {
        match.group(1)
        for line in ALGORITHMS.read_text(encoding="utf-8").splitlines()
        if (match := HEADING.match(line))
    }


def citations(parse) -> dict[str, list[str]]:
    """What each package source cites, ``{citation: ["llmq/path.py:line", ...]}``."""
    where: dict[str, list[str]] = {}
    for path in package_sources():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for cited in parse(line):
                where.setdefault(cited, []).append(f"{path.relative_to(REPO)}:{number}")
    return where


def test_the_citation_parsers_read_sections_ranges_and_labels_as_the_package_writes_them():
    assert cited_sections("see docs/algorithms.md §2.3–2.4 and §4.4 item 2, (§8.6.7), §4") == {
        "2.3",
        "2.4",
        "4.4",
        "8.6",
        "4",
    }
    assert cited_sections("§8.3–8.5; §5.4-5.5; §2–4") == {"8.3", "8.4", "8.5", "5.4", "5.5", "2", "3", "4"}
    assert cited_sections("(ALGORITHMS.md §7.1, DESIGN.md §3)") == {"7.1"}
    assert cited_labels("(S3) and (S2, default); R2) B1–B3 (E6, the identity) E8:") == {
        "S3",
        "S2",
        "R2",
        "B1",
        "B2",
        "B3",
        "E6",
        "E8",
    }
    assert cited_labels("S3Client, log2(B1x), 1.E5, BE2 and b2") == set()


def test_no_module_of_the_package_cites_the_unshipped_reference_documents():
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in package_text_files()
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1)
        if any(name in line for name in UNSHIPPED_DOCUMENTS)
    ]
    assert not offenders, "cite docs/algorithms.md instead of documents that do not ship:\n" + "\n".join(offenders)


def test_every_section_cited_in_the_package_exists_in_docs_algorithms():
    headings = document_headings()
    assert {"1", "1.1", "1.3", "2.3", "2.4", "8.2"} <= headings  # the parser reads this document's headings
    missing = {section: places for section, places in citations(cited_sections).items() if section not in headings}
    assert not missing, "sections cited in llmq/ but absent from docs/algorithms.md: " + "; ".join(
        f"§{section} ({', '.join(places)})" for section, places in sorted(missing.items())
    )


def test_every_equation_label_cited_in_the_package_is_defined_next_to_its_equation_in_docs_algorithms():
    # An equation line of the document ends with its label, e.g. "V*(s) = β log Σ_a … (B2)".
    defined = {
        match.group(1)
        for line in ALGORITHMS.read_text(encoding="utf-8").splitlines()
        if (match := re.search(r"\(([BERS]\d{1,2})\)\s*$", line))
    }
    assert {"B1", "B2", "B3", "S2", "S3", "R2"} <= defined
    missing = {label: places for label, places in citations(cited_labels).items() if label not in defined}
    assert not missing, "equation labels cited in llmq/ but not defined in docs/algorithms.md: " + "; ".join(
        f"({label}) ({', '.join(places)})" for label, places in sorted(missing.items())
    )
