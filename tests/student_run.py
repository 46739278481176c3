"""Execute the student edition of every notebook with exercises, headless, one after another.

    python tests/student_run.py OUT [NAME.ipynb ...]   # OUT/student/*.ipynb written, OUT/executed/*.ipynb run

Started by tests/conftest.py in the background of a test session that includes
tests/test_student_editions.py (it lowers its own priority, and so its kernels', to run on the
core the mostly single-threaded suite leaves free), so that `make test` executes every student edition without waiting for them one by
one; the tests in that file wait for this process and read what it wrote. Each notebook runs in
its own kernel in OUT/run/NAME/ (files it writes stay there), with the environment the classroom
tests give a kernel: this checkout's sdlearn, one thread, capstone pieces under OUT.

A notebook that stops on an error is written as far as it ran, with the error in
OUT/executed/NAME.error.txt; the tests report it. On SIGTERM (the session ended early) it shuts
its kernel down and stops; it also stops if the test session that started it dies.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import nbformat
from nbconvert.preprocessors import ExecutePreprocessor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import student_edition  # noqa: E402  (tools/student_edition.py)
from sdlearn.exercises import PIECES  # noqa: E402


def kernel_env(tmp: Path) -> dict:
    """The environment a kernel gets: this checkout's sdlearn, one thread, capstone pieces in tmp;
    the venv's bin/ first on PATH (nbgrader runs its `alembic` from there)."""
    return {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "SDLEARN_MY_SD": str(tmp / "my_sd"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "SDLEARN_THREADS": os.environ.get("SDLEARN_THREADS", "1"), "SDLEARN_DEVICE": "cpu"}


def notebooks() -> list[Path]:
    """The notebooks whose student edition is run: every one in notebooks/ with an exercise check."""
    return [p for p in sorted((REPO / "notebooks").glob("*.ipynb"))
            if any(student_edition.is_check_cell(c) for c in nbformat.read(p, as_version=4).cells)]


def check_ran_to_the_end(nb, instructor) -> None:
    """Assert that an executed student edition `nb` ran every code cell, with errors only in the
    check cells (each saying "not written yet"; the capstone's naming every piece still to write),
    and as many check cells as the instructor edition `instructor` has."""
    checks = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert cell.execution_count is not None, f"cell not run:\n{cell.source}"
        errors = [o for o in cell.outputs if o.output_type == "error"]
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        if student_edition.is_check_cell(cell):
            checks += 1
            assert [e.ename for e in errors] == ["NotWrittenYet"], cell.source
            if cell.metadata.get("nbgrader", {}).get("grade_id") == "capstone_check":
                said = errors[0].evalue                       # nothing written: every piece is named
                assert "still to write" in said and all(piece in said for piece in PIECES), said
            else:
                assert "not written yet" in text, text
        else:
            assert not errors, f"{cell.source}\n{errors}"
    assert checks == sum(student_edition.is_check_cell(c) for c in instructor.cells) >= 1


def start_in_background(names: list[str]) -> tuple[subprocess.Popen, Path, object]:
    """Run this file on `names` (all notebooks with exercises if empty) in a new process writing to
    a new temporary folder; returns (the process, the folder, its open log file)."""
    out = Path(tempfile.mkdtemp(prefix="sdlearn-student-run-"))
    log = open(out / "log.txt", "w")
    proc = subprocess.Popen([sys.executable, str(Path(__file__)), str(out), *names],
                            env=kernel_env(out), stdout=log, stderr=subprocess.STDOUT)
    return proc, out, log


def _stop_with_the_session(parent: int) -> None:
    """A daemon thread: when the test session that started this process is gone (killed without
    its cleanup), stop as on SIGTERM."""
    while os.getppid() == parent:
        time.sleep(2)
    os.kill(os.getpid(), signal.SIGTERM)


def _exit(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")   # unwinds through nbclient, which shuts the kernel down


def main(out: Path, names: list[str] | None = None) -> int:
    if hasattr(os, "nice"):
        os.nice(10)                                     # the suite's own tests come first; kernels inherit it
    signal.signal(signal.SIGTERM, _exit)
    parent = os.getppid()
    threading.Thread(target=_stop_with_the_session, args=(parent,), daemon=True).start()
    try:
        return _run(out, [p for p in notebooks() if not names or p.name in names])
    finally:
        if os.getppid() != parent:                      # nobody is left to read it or clean it up
            shutil.rmtree(out, ignore_errors=True)


def _run(out: Path, sources: list[Path]) -> int:
    student_edition.write_edition(sources, out / "student")
    (out / "executed").mkdir(parents=True, exist_ok=True)
    for src in sources:
        nb = nbformat.read(out / "student" / src.name, as_version=4)
        cwd = out / "run" / src.stem
        cwd.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            ExecutePreprocessor(timeout=900, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(cwd)}})
        except Exception:                     # noqa: BLE001 — any failure is recorded for the test to show
            (out / "executed" / f"{src.stem}.error.txt").write_text(traceback.format_exc()[-4000:])
        nb.metadata["sdlearn_seconds"] = round(time.perf_counter() - start, 1)
        nbformat.write(nb, out / "executed" / src.name)
    (out / "executed" / "DONE").write_text("\n".join(p.name for p in sources))
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
