"""Exercises for the notebooks: checks that explain mistakes, and the capstone.

    from sdlearn import exercises
    exercises.check("timestep_embedding", timestep_embedding)   # ✓ or ✗ with a hint
    exercises.list_exercises("04_unet")                         # what there is to write
    with exercises.use(exercises.load_saved(), pipe):           # your pieces inside the package
        pipe.generate(...)

The exercises of notebook NN live in `sdlearn/exercises/nbNN_*.py`: each names the package
function it is checked against, the inputs, and the usual mistakes with their hints.
"""
from __future__ import annotations

import importlib
import pkgutil

from .capstone import PIECES, missing, use
from .core import (EXERCISES, Case, Exercise, ExerciseFailed, Mistake, NotWrittenYet, Report, check,
                   load_saved, register, run_check, saved_folder)

for _module in pkgutil.iter_modules(__path__):
    if _module.name.startswith("nb"):
        importlib.import_module(f"{__name__}.{_module.name}")


def list_exercises(notebook: str | None = None) -> list[str]:
    """The exercise names (of one notebook, e.g. "04_unet"), in the order they are defined."""
    return [name for name, ex in EXERCISES.items() if notebook is None or ex.notebook == notebook]


__all__ = ["EXERCISES", "PIECES", "Case", "Exercise", "ExerciseFailed", "Mistake", "NotWrittenYet", "Report",
           "check", "list_exercises", "load_saved", "missing", "register", "run_check", "saved_folder", "use"]
