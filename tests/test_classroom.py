"""The classroom edition (issue 16): the exercise cells, `make student`, and nbgrader grading them.

Runs on the fixture tests/fixtures/classroom_demo.ipynb (two exercises in the series' format) and
on every notebook in notebooks/ that has exercise cells. Kept fast for `make test`:

  * the cell conventions and the student edition are checked on every notebook with exercises
    (no kernel: each stub is run against its check in this process);
  * headless, the student edition of the fixture is executed to the end here; every real
    notebook's, in the background of the session, by tests/test_student_editions.py;
  * nbgrader itself (generate_assignment, then autograde of two submissions) runs on the fixture;
    on every real notebook it only generates the assignment. Autograding the real notebooks
    (each executed twice; 03–05 again with 06) is the `full` test below (`make test-full`).
"""
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "classroom_demo.ipynb"
sys.path.insert(0, str(REPO / "tools"))

import student_edition  # noqa: E402  (tools/student_edition.py)

pytest.importorskip("nbgrader", reason="the classroom extra (nbgrader) is not installed: pip install -e '.[classroom]'")

import student_run  # noqa: E402  (tests/student_run.py: the kernel's environment, the headless check)
from student_run import kernel_env  # noqa: E402

CHECK_RE = re.compile(r'exercises\.check\("(\w+)", (\w+)\)')
SOLUTION_META = {"grade": False, "locked": False, "schema_version": 3, "solution": True, "task": False}
CHECK_META = {"grade": True, "locked": True, "points": 1, "schema_version": 3, "solution": False, "task": False}


def read(path: Path):
    return nbformat.read(path, as_version=4)


def exercise_cells(nb) -> list[tuple[str, int, int]]:
    """(name, index of the stub/solution cell, index of the check cell) for each exercise."""
    found = []
    for i, cell in enumerate(nb.cells):
        if student_edition.is_check_cell(cell) and cell.metadata.get("nbgrader", {}).get("grade_id") != "capstone_check":
            m = CHECK_RE.fullmatch(cell.source.strip())
            name = m.group(1) if m else None
            stub = next((j for j in range(i - 1, -1, -1) if nb.cells[j].cell_type == "code"), None)
            found.append((name, stub, i))
    return found


def notebooks_with_exercises() -> list[Path]:
    return [p for p in sorted((REPO / "notebooks").glob("*.ipynb")) if exercise_cells(read(p))]


WITH_EXERCISES = [FIXTURE] + notebooks_with_exercises()
IDS = [p.stem for p in WITH_EXERCISES]




@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("edition") / "student"
    student_edition.write_edition(WITH_EXERCISES, out)
    return out


def _ensure_registered(path: Path, names: list[str]) -> None:
    """The fixture registers its own second exercise in its first code cell; do so here too."""
    from sdlearn import exercises
    if path == FIXTURE and any(n not in exercises.EXERCISES for n in names):
        setup = next(c for c in read(path).cells if c.cell_type == "code" and "exercises.register" in c.source)
        exec(compile(setup.source, str(path), "exec"), {})


# ----------------------------------------------------------------------------- the conventions

@pytest.mark.parametrize("path", WITH_EXERCISES, ids=IDS)
def test_exercise_cells_follow_the_convention(path):
    nb = read(path)
    cells = exercise_cells(nb)
    names = [name for name, _, _ in cells]
    assert None not in names, "a check cell's source must be exactly exercises.check(\"<name>\", <name>)"
    assert len(set(names)) == len(names), f"an exercise is checked twice: {names}"
    _ensure_registered(path, names)
    from sdlearn import exercises
    first_check = min(i for _, _, i in cells)
    assert any("from sdlearn import" in c.source and "exercises" in c.source
               for c in nb.cells[:first_check] if c.cell_type == "code"), "import exercises before the first check"
    for name, stub, check in cells:
        assert name in exercises.EXERCISES, f"{name}: no such exercise in sdlearn.exercises"
        check_cell, stub_cell = nb.cells[check], nb.cells[stub]
        assert check_cell.source.strip() == f'exercises.check("{name}", {name})'
        assert check_cell.metadata["nbgrader"] == {**CHECK_META, "grade_id": f"{name}_check"}, name
        assert stub_cell.metadata.get("nbgrader") == {**SOLUTION_META, "grade_id": f"{name}_solution"}, name
        assert f"def {name}(" in stub_cell.source, f"{name}: the cell before the check must define it"
        src = stub_cell.source
        assert src.count("### BEGIN SOLUTION") == 1 and src.count("### END SOLUTION") == 1, name
        assert src.index("### BEGIN SOLUTION") < src.index("### END SOLUTION"), name
        title = next(c for c in reversed(nb.cells[:stub]) if c.cell_type == "markdown")
        assert title.source.lstrip().startswith("### Your turn:"), f"{name}: a '### Your turn:' cell comes first"
        # Later cells use the package's version, never the learner's function (it raises in the
        # student edition): the name appears again only in other checks or in comments/prose.
        # (A later `def name(`, `name = …` or `import … name` gives the name back to the package.)
        rebinds = re.compile(rf"^\s*(def {name}\s*\(|{name}\s*=[^=]|(from\s+\S+\s+)?import\b.*\b{name}\b)", re.M)
        for later in nb.cells[check + 1:]:
            if later.cell_type == "code" and not student_edition.is_check_cell(later):
                code = re.sub(r"#.*", "", later.source)
                rebound = rebinds.search(code)
                call = re.search(rf"(?<![\w.]){name}\s*\(", code)
                assert not call or (rebound and rebound.start() < call.start()), \
                    f"a later cell calls the learner's {name} (it raises in the student edition):\n{later.source}"
                if rebound:
                    break


# ----------------------------------------------------------------------------- the student edition

@pytest.mark.parametrize("path", WITH_EXERCISES, ids=IDS)
def test_student_edition_clears_solutions_and_outputs_and_tags_the_checks(path, student_dir):
    teacher, student = read(path), read(student_dir / path.name)
    assert len(teacher.cells) == len(student.cells)
    cells = exercise_cells(teacher)
    stubs = {stub for _, stub, _ in cells}
    _ensure_registered(path, [n for n, _, _ in cells])
    from sdlearn import exercises
    for i, (t, s) in enumerate(zip(teacher.cells, student.cells)):
        assert t.cell_type == s.cell_type
        if s.cell_type != "code":
            assert s.source == t.source
            continue
        assert s.outputs == [] and s.execution_count is None
        assert "BEGIN SOLUTION" not in s.source and "END SOLUTION" not in s.source
        if student_edition.is_check_cell(t):
            assert s.source == t.source
            assert "raises-exception" in s.metadata.tags and "exercise-check" in s.metadata.tags
            assert s.metadata.editable is False and s.metadata.deletable is False
        elif i in stubs:
            assert "raise NotImplementedError()" in s.source
        else:
            assert s.source == t.source and "raises-exception" not in s.metadata.get("tags", [])
    for name, stub, _ in cells:
        namespace = {}
        try:
            exec(compile("from __future__ import annotations\nimport math\nimport torch\n"
                         "import torch.nn.functional as F\nimport numpy as np\n" + student.cells[stub].source,
                         f"{path.name}:{name}", "exec"), namespace)
        except NameError as err:        # a default argument from the notebook's own variables
            warnings.warn(f"{path.name}: the stub of {name} needs the notebook's variables ({err}); "
                          "only the headless run checks it")
            continue
        report = exercises.run_check(name, namespace[name])
        assert not report.passed and not report.written and "not written yet" in report.message, report.message


def test_the_student_edition_is_never_overwritten_silently(tmp_path, capsys):
    out = tmp_path / "student"
    assert student_edition.main([str(FIXTURE), "--out", str(out)]) == 0
    work = out / "classroom_demo.ipynb"
    work.write_text(work.read_text().replace("raise NotImplementedError()", "return None  # my work"))
    assert student_edition.main([str(FIXTURE), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and "my work" in work.read_text()
    assert student_edition.main([str(FIXTURE), "--out", str(out), "--overwrite"]) == 0
    assert "replaced" in capsys.readouterr().out and "my work" not in work.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]       # no staging folder left behind


def test_make_student_writes_student_and_refuses_to_overwrite(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    plan = subprocess.run(["make", "-n", "student", f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout
    assert "tools/student_edition.py" in plan and "--out student" in plan and "--overwrite" not in plan
    assert "classroom]" in plan
    plan = subprocess.run(["make", "-n", "student", "OVERWRITE=1", f"VENV={tmp_path / 'venv'}"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
    assert "--overwrite" in plan
    assert "/student/" in (REPO / ".gitignore").read_text().split()


@pytest.mark.timeout(900)
def test_student_edition_of_the_fixture_runs_headless_to_the_end(student_dir, tmp_path, monkeypatch):
    """Errors only in the check cells, each saying "not written yet"; every other cell ran. (The real
    notebooks: tests/test_student_editions.py.)"""
    path = FIXTURE
    from nbconvert.preprocessors import ExecutePreprocessor
    for k, v in kernel_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    nb = read(student_dir / path.name)
    ExecutePreprocessor(timeout=900, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(tmp_path)}})
    student_run.check_ran_to_the_end(nb, read(path))


# ----------------------------------------------------------------------------- nbgrader itself

def nbgrader(course: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nbgrader", *args, f"--course-dir={course}", f"--db=sqlite:///{course / 'gradebook.db'}"]
    out = subprocess.run(cmd, cwd=course, capture_output=True, text=True, env=env or kernel_env(course), timeout=900)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout}\n{out.stderr}"
    return out


def course_with(tmp: Path, assignment: str, notebooks: list[Path]) -> Path:
    """A course folder (source/ASSIGNMENT/*.ipynb, its own gradebook in tmp) with the release generated."""
    course = tmp / "course"
    (course / "source" / assignment).mkdir(parents=True)
    (course / "nbgrader_config.py").write_text("c = get_config()\n")
    for nb in notebooks:
        shutil.copy(nb, course / "source" / assignment / nb.name)
    nbgrader(course, "generate_assignment", assignment, "--create")
    return course


def scores(course: Path, assignment: str, students: list[str]) -> dict[str, tuple[float, float]]:
    from nbgrader.api import Gradebook
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        return {s: (gb.find_submission(assignment, s).score, gb.find_submission(assignment, s).max_score)
                for s in students}


def autograde(course: Path, assignment: str, submissions: dict[str, Path], tmp: Path,
              env: dict | None = None) -> dict[str, tuple[float, float]]:
    for student, folder in submissions.items():
        shutil.copytree(folder, course / "submitted" / student / assignment)
    nbgrader(course, "autograde", assignment, "--create", env=env or kernel_env(tmp))   # every submission, one run
    return scores(course, assignment, list(submissions))


@pytest.mark.timeout(600)
def test_nbgrader_gives_full_marks_to_the_instructor_edition_and_zero_to_the_student_edition(tmp_path):
    course = course_with(tmp_path, "demo", [FIXTURE])
    release = course / "release" / "demo" / FIXTURE.name
    assert "raise NotImplementedError()" in release.read_text() and "BEGIN SOLUTION" not in release.read_text()
    got = autograde(course, "demo", {"teacher": course / "source" / "demo", "learner": release.parent}, tmp_path)
    n = len(exercise_cells(read(FIXTURE)))
    assert got == {"teacher": (n, n), "learner": (0, n)}


def test_nbgrader_generates_the_assignment_from_every_notebook_with_exercises(tmp_path):
    real = [p for p in WITH_EXERCISES if p != FIXTURE]
    if not real:
        pytest.skip("no notebook in notebooks/ has exercise cells yet")
    course = course_with(tmp_path, "series", real)
    for path in real:
        release = read(course / "release" / "series" / path.name)
        mine = read(path)
        stubs = [release.cells[stub].source for _, stub, _ in exercise_cells(mine)]
        assert all("raise NotImplementedError()" in s and "BEGIN SOLUTION" not in s for s in stubs), path.name
        from nbgrader.api import Gradebook
        with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
            notebook = gb.find_notebook(path.stem, "series")
            assert notebook.max_score == points(path)[1], path.name


def graded_with(path: Path) -> list[Path]:
    """The notebooks an assignment needs for `path` to be graded: itself, and for the capstone
    (notebook 06) the notebooks whose check cells save the pieces it runs (03–05), as when a class
    hands in the series as one assignment."""
    if not any(c.metadata.get("nbgrader", {}).get("grade_id") == "capstone_check" for c in read(path).cells):
        return [path]
    from sdlearn import exercises
    earlier = {exercises.EXERCISES[piece].notebook for piece in exercises.PIECES} - {path.stem}
    return sorted(REPO / "notebooks" / f"{name}.ipynb" for name in earlier) + [path]


def points(path: Path) -> tuple[int, int]:
    """(exercise checks, total points) of a notebook: one per exercise, plus the capstone's own."""
    nb = read(path)
    n = len(exercise_cells(nb))
    capstone = sum(c.metadata["nbgrader"].get("points", 0) for c in nb.cells
                   if c.metadata.get("nbgrader", {}).get("grade_id") == "capstone_check")
    return n, n + capstone


def test_the_capstone_is_graded_with_the_notebooks_that_write_its_pieces():
    six = REPO / "notebooks" / "06_sampling.ipynb"
    assert [p.stem[:2] for p in graded_with(six)] == ["03", "04", "05", "06"]
    assert graded_with(REPO / "notebooks" / "04_unet.ipynb") == [REPO / "notebooks" / "04_unet.ipynb"]


@pytest.mark.full
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("path", WITH_EXERCISES[1:], ids=IDS[1:])
def test_nbgrader_autogrades_a_real_notebook(path, tmp_path):
    """Slow (each notebook runs twice, and 03–05 twice more for 06): `make test-full` only. nbgrader runs a submission's notebooks
    in name order, each in the submission's folder; without SDLEARN_MY_SD the check cells save the
    capstone's pieces in that folder's my_sd/, so each submission's capstone runs its own pieces."""
    notebooks = graded_with(path)
    course = course_with(tmp_path, "series", notebooks)
    release = course / "release" / "series"
    env = {k: v for k, v in kernel_env(tmp_path).items() if k != "SDLEARN_MY_SD"}
    got = autograde(course, "series", {"teacher": course / "source" / "series", "learner": release}, tmp_path, env)
    total = sum(points(p)[1] for p in notebooks)
    assert got == {"teacher": (total, total), "learner": (0, total)}


def test_the_test_set_and_ci_install_what_these_tests_need():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "sdlearn[classroom]" in extras["test"] and "sdlearn[browser]" in extras["test"]
    assert any(d.startswith("nbgrader") for d in extras["classroom"])
    assert any(d.startswith("selenium") for d in extras["browser"])
    ci = (REPO / ".ci" / "run").read_text()
    assert "apt-get install" in ci and "chromium chromium-driver" in ci
