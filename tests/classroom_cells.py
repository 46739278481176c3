"""What tests/test_exercises_nb03.py and _nb04.py check in a classroom notebook: the stub and check
cells of each exercise follow the nbgrader conventions of issue 16, no later cell calls the
learner's function (in the student edition it raises), and the main body's length."""
from __future__ import annotations

import json
import re
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def cells(notebook: str) -> list[dict]:
    return json.loads((NOTEBOOKS / f"{notebook}.ipynb").read_text())["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def main_body_words(notebook: str) -> int:
    """Markdown words before the first cell that starts with "## Going further", code fences left out."""
    md = [source(c) for c in cells(notebook) if c["cell_type"] == "markdown"]
    end = next((i for i, m in enumerate(md) if m.lstrip().startswith("## Going further")), len(md))
    return len(re.sub(r"```.*?```", "", " ".join(md[:end]), flags=re.S).split())


def exercise_problems(notebook: str, name: str) -> list[str]:
    """What is wrong with exercise `name`'s cells in `notebook` (empty when nothing is)."""
    all_cells = cells(notebook)
    problems = []
    solutions = [i for i, c in enumerate(all_cells)
                 if c["metadata"].get("nbgrader", {}).get("grade_id") == f"{name}_solution"]
    if len(solutions) != 1:
        return [f"{name}: {len(solutions)} solution cells"]
    i = solutions[0]
    stub, check = all_cells[i], all_cells[i + 1]
    if not source(all_cells[i - 1]).startswith("### Your turn:"):
        problems.append(f"{name}: no '### Your turn:' cell before the stub")
    text = source(stub)
    if not re.search(rf"^def {name}\(", text, flags=re.M) or "### BEGIN SOLUTION" not in text \
            or "### END SOLUTION" not in text:
        problems.append(f"{name}: the stub is not `def {name}(…)` with a marked solution")
    grader = check["metadata"].get("nbgrader", {})
    if source(check) != f'exercises.check("{name}", {name})' or grader.get("grade_id") != f"{name}_check" \
            or not grader.get("locked") or "exercise-check" not in check["metadata"].get("tags", []):
        problems.append(f"{name}: the cell after the stub is not its locked, tagged check cell")
    for later in all_cells[i + 2:]:
        if later["cell_type"] == "code" and re.search(rf"(?<![.\w]){name}\(", source(later)):
            problems.append(f"{name}: a later cell calls the learner's function: {source(later)[:60]!r}")
    return problems
