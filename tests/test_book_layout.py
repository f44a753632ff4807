"""The book's pages show the code a reader runs and fold the code that only draws.

Chapters are MyST notebooks; this reads their code cells as text (no Jupyter needed) and checks
the layout rules of docs/book.md. Executing them is ``make book``'s job.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
CHAPTERS = sorted(BOOK.glob("ch*.md"))
DRAWS = re.compile(r"\bplt\.|\bax\.|\baxes\[|\bfig\.")
# work a reader must see: it changes what the chapter measures or asserts
COMPUTES = re.compile(r"\bassert\b|evaluate_|Calibrator|run_merge|bench_zoo|merged_model\(|\.run\(")


def code_cells(path: Path) -> list[tuple[list[str], str]]:
    """(tags, source) of every ``{code-cell}`` of a MyST notebook."""
    cells, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```{code-cell}"):
            j = lines.index("```", i + 1)
            body = lines[i + 1 : j]
            tags: list[str] = []
            if body and body[0].startswith(":tags:"):
                tags = [t.strip() for t in body[0].split("[", 1)[1].rstrip("]").split(",")]
                body = body[1:]
            cells.append((tags, "\n".join(body)))
            i = j
        i += 1
    return cells


def test_the_chapters_are_found():
    assert len(CHAPTERS) >= 7 and all(code_cells(p) for p in CHAPTERS[:6])


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_drawing_is_folded_and_folded_code_only_draws(chapter):
    for tags, source in code_cells(chapter):
        if DRAWS.search(source):
            assert "hide-input" in tags, f"{chapter.name}: a cell that draws is shown:\n{source}"
        if "hide-input" in tags:
            hit = COMPUTES.search(source)
            assert hit is None, f"{chapter.name}: folded cell computes ({hit[0]}):\n{source}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_code_lines_fit_the_page(chapter):
    long = [line for _, src in code_cells(chapter) for line in src.splitlines() if len(line) > 88]
    assert long == [], f"{chapter.name}: code lines over 88 characters scroll sideways"


def test_every_chapter_runs_in_one_lane_of_make_book(monkeypatch):
    pytest.importorskip("yaml")
    monkeypatch.syspath_prepend(str(BOOK))
    import execute_chapters

    execute_chapters.check_lanes()  # raises SystemExit naming a chapter no lane runs
    sys.modules.pop("execute_chapters", None)
