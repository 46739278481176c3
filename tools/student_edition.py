"""Write the student edition of the notebooks (`make student`): nbgrader's own preprocessors, no course folder.

    python tools/student_edition.py                        # notebooks/*.ipynb → student/
    python tools/student_edition.py --out student --overwrite
    python tools/student_edition.py notebooks/04_unet.ipynb --out /tmp/s

The committed notebooks are the instructor edition. For each one this runs the preprocessors that
`nbgrader generate_assignment` runs on a release (LockCells, ClearSolutions, ClearOutput,
ClearHiddenTests, ClearMarkScheme, ComputeChecksums, CheckCellMetadata), so:

  * the code between `### BEGIN SOLUTION` and `### END SOLUTION` becomes
    `# YOUR CODE HERE` / `raise NotImplementedError()` (a learner's check then says "not written yet");
  * every output and execution count is cleared;
  * the graded, locked cells (the checks) cannot be edited or deleted in Jupyter;

and then tags each check cell (tag "exercise-check") "raises-exception" as well, so that Run All
in JupyterLab, `jupyter nbconvert --execute` and nbval go on past a check that is not passed yet.

The output folder is never overwritten silently: if it exists the tool stops (exit status 2) unless
--overwrite is given, and then it writes the new edition beside it and swaps it in whole, so an
old student/ never ends up half replaced. Files other than notebooks are not copied (the notebooks
find their data through the package; student/ sits at the same depth as notebooks/).
"""
from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
CHECK_TAG = "exercise-check"
RAISES_TAG = "raises-exception"


def _preprocessors():
    try:
        from nbgrader.preprocessors import (CheckCellMetadata, ClearHiddenTests, ClearMarkScheme, ClearOutput,
                                            ClearSolutions, ComputeChecksums, LockCells)
    except ImportError as err:        # the `classroom` extra
        raise SystemExit(f"the student edition needs nbgrader ({err}); install it with "
                         "`pip install -e \".[classroom]\"` (make student does)") from err
    return [LockCells(), ClearSolutions(), ClearOutput(), ClearHiddenTests(), ClearMarkScheme(),
            ComputeChecksums(), CheckCellMetadata()]


def is_check_cell(cell) -> bool:
    return CHECK_TAG in cell.get("metadata", {}).get("tags", [])


def student_notebook(nb):
    """The student edition of one instructor notebook (a new NotebookNode; `nb` is left alone)."""
    nb = copy.deepcopy(nb)
    resources: dict = {}
    for pre in _preprocessors():
        nb, resources = pre.preprocess(nb, resources)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)           # the instructor's run times
        if is_check_cell(cell):
            tags = cell.metadata.setdefault("tags", [])
            if RAISES_TAG not in tags:
                tags.append(RAISES_TAG)
    return nb


def write_edition(sources: list[Path], out: Path, *, overwrite: bool = False) -> list[Path]:
    """Write the student edition of `sources` into the folder `out` (which must not exist, unless
    `overwrite`: then it is replaced whole). Returns the notebooks written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-new-", dir=out.parent))
    try:
        written = []
        for src in sources:
            nb = nbformat.read(src, as_version=4)
            path = staging / src.name
            nbformat.write(student_notebook(nb), path)
            written.append(out / src.name)
        if out.exists():
            old = out.parent / f".{out.name}-old"
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="instructor notebooks (default: every notebooks/*.ipynb)")
    parser.add_argument("--out", type=Path, default=REPO / "student", help="the folder to write (default: student/)")
    parser.add_argument("--overwrite", action="store_true", help="replace the folder if it exists")
    args = parser.parse_args(argv)
    sources = args.notebooks or sorted((REPO / "notebooks").glob("*.ipynb"))
    if not sources:
        print("no notebooks to convert", file=sys.stderr)
        return 1
    existed = args.out.exists()
    try:
        written = write_edition(sources, args.out, overwrite=args.overwrite)
    except FileExistsError:
        print(f"{args.out} already exists and may hold a learner's work; not touching it. Move it away, or "
              f"replace it with `make student OVERWRITE=1` (tools/student_edition.py --overwrite).", file=sys.stderr)
        return 2
    checks = sum(is_check_cell(c) for p in written for c in nbformat.read(p, as_version=4).cells)
    print(f"wrote the student edition of {len(written)} notebooks ({checks} exercises) to {args.out}"
          + (" (it replaced the old one)" if existed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
