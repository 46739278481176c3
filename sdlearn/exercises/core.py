"""Exercise checks: run a learner's function against the package's and explain any difference.

    check("timestep_embedding", timestep_embedding)

runs the learner's function on every input of the exercise (random tensors with a fixed seed and
the edge cases), compares each answer with the package's, and prints one or two sentences:

    ✓ timestep_embedding: right on all 5 inputs (largest difference 2.4e-07).
    ✗ timestep_embedding: for t = [0, 1, 500, 999], dim = 320, element [0, 0] is 0 where 1 was
      expected (largest difference 1.0). Hint: your embedding starts with sin; SD puts cos first.

How a hint is found: every exercise carries the usual mistakes as small wrong implementations
(`Mistake`). When an answer is wrong, each mistake is run on the same input; if one gives the
learner's answer, its hint is shown. Otherwise the exercise's general hint is. A check never
shows the package's code or its answer, only where the two differ.

A function that is not written yet (it raises NotImplementedError, as the student edition's
stubs do) is reported as such. Both a wrong answer and a missing one raise an exception after
the message (`ExerciseFailed`, `NotWrittenYet`), so nbgrader scores the check cell as failed; the
student edition tags check cells `raises-exception` so a notebook still runs to the end.

A right answer that a later notebook's capstone needs is saved, as source, to `my_sd/` beside
the notebook (`saved_folder`), so notebook 06 can build a Stable Diffusion from your own pieces.
"""
from __future__ import annotations

import copy
import inspect
import math
import os
import textwrap
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ENV_FOLDER = "SDLEARN_MY_SD"        # where right answers are saved (default: ./my_sd)


class NotWrittenYet(Exception):
    """The exercise's function still raises NotImplementedError."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback: the message above already said it all
        return [f"{type(self).__name__}: {self}"]


class ExerciseFailed(AssertionError):
    """The learner's function gave a different answer (the message says where)."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


@dataclass
class Case:
    """One input of an exercise: `label` is how the message names it ("t = [0, 999], dim = 320")."""
    label: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass
class Mistake:
    """A usual mistake, written as the wrong function, and the hint a learner who made it gets."""
    hint: str
    wrong: Callable


@dataclass
class Exercise:
    name: str                            # the function's name in the notebook
    notebook: str                        # "04_unet"
    reference: Callable                  # the right answer (usually the package's own code)
    cases: Callable[[], list[Case]]      # built on demand (fixed seeds), so importing is cheap
    mistakes: list[Mistake] = field(default_factory=list)
    hint: str = ""                       # when no planted mistake explains the answer
    atol: float = 1e-5
    rtol: float = 1e-4
    capstone: bool = False               # saved to my_sd/ when right, for notebook 06's capstone
    compare: Callable | None = None      # (got, expected) → None if equal, else what differs


EXERCISES: dict[str, Exercise] = {}


def register(exercise: Exercise) -> Exercise:
    if exercise.name in EXERCISES:
        raise ValueError(f"exercise {exercise.name!r} is defined twice")
    EXERCISES[exercise.name] = exercise
    return exercise


# ----------------------------------------------------------------------------------- comparing

def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def _index(flat: int, shape: tuple) -> list[int]:
    out = []
    for n in reversed(shape):
        out.append(flat % n)
        flat //= n
    return out[::-1]


def _number(v: float) -> str:
    return f"{v:.4g}"


def difference(got: Any, expected: Any, atol: float, rtol: float, where: str = "") -> str | None:
    """None when `got` equals `expected` (tensors to atol + rtol·|expected|); else one sentence
    saying where they differ first. Tuples, lists and dicts are compared item by item."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{where or 'the answer'} is {_describe(got)}; expected {_describe(expected)}"
        if got.shape != expected.shape:
            return f"{where or 'the answer'} has shape {tuple(got.shape)}; expected {tuple(expected.shape)}"
        if got.dtype.is_floating_point != expected.dtype.is_floating_point or (
                not expected.dtype.is_floating_point and got.dtype != expected.dtype):
            return f"{where or 'the answer'} has dtype {got.dtype}; expected {expected.dtype}"
        if got.device != expected.device:
            return f"{where or 'the answer'} is on {got.device}; expected {expected.device}"
        g, e = got.detach().double(), expected.detach().double()
        bad = ~torch.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True)
        if not bad.any():
            return None
        err = (g - e).abs().nan_to_num(nan=math.inf)
        first = int(bad.flatten().nonzero()[0])
        idx = _index(first, tuple(e.shape))
        at = f"element {idx} of {where}" if where else f"element {idx}"
        return (f"{at} is {_number(g.flatten()[first].item())} where {_number(e.flatten()[first].item())} was "
                f"expected ({int(bad.sum())} of {bad.numel()} elements differ, largest difference "
                f"{_number(err.max().item())})")
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            n = len(got) if isinstance(got, (tuple, list)) else None
            return (f"{where or 'the answer'} is {_describe(got)}{f' of {n} items' if n is not None else ''}; "
                    f"expected a {type(expected).__name__} of {len(expected)} items")
        for i, (a, b) in enumerate(zip(got, expected)):
            d = difference(a, b, atol, rtol, f"{where or 'the answer'}[{i}]")
            if d:
                return d
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return f"{where or 'the answer'} is {_describe(got)}; expected a dict"
        if set(got) != set(expected):
            missing, extra = sorted(set(expected) - set(got), key=str), sorted(set(got) - set(expected), key=str)
            return (f"{where or 'the answer'} has keys that differ: missing {missing[:5]}, unexpected {extra[:5]}")
        for k in expected:
            d = difference(got[k], expected[k], atol, rtol, f"{where or 'the answer'}[{k!r}]")
            if d:
                return d
        return None
    if isinstance(expected, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if math.isclose(got, expected, rel_tol=rtol, abs_tol=atol):
            return None
        return f"{where or 'the answer'} is {_number(got)}; expected {_number(expected)}"
    if isinstance(got, torch.Tensor) and isinstance(expected, (int, float)):
        if got.numel() == 1:
            return difference(got.item(), float(expected), atol, rtol, where)
        return f"{where or 'the answer'} is {_describe(got)}; expected a single number"
    if got == expected:
        return None
    return f"{where or 'the answer'} is {got!r}; expected {expected!r}"


def _largest(got: Any, expected: Any) -> float:
    if isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor) and expected.numel():
        return (got.detach().double() - expected.detach().double()).abs().max().item()
    if isinstance(expected, (tuple, list)):
        return max([_largest(a, b) for a, b in zip(got, expected)] or [0.0])
    if isinstance(expected, dict):
        return max([_largest(got[k], expected[k]) for k in expected] or [0.0])
    if isinstance(expected, float):
        return abs(float(got) - expected)
    return 0.0


# ------------------------------------------------------------------------------------- checking

def _call(fn: Callable, case: Case):
    # Deep copies: a function that changes its input in place must not spoil the next comparison.
    return fn(*copy.deepcopy(case.args), **copy.deepcopy(case.kwargs))


def _same(ex: Exercise, got: Any, expected: Any) -> str | None:
    if ex.compare is not None:
        return ex.compare(got, expected)
    return difference(got, expected, ex.atol, ex.rtol)


def _is_form(diff: str) -> bool:
    """Whether a `difference` sentence is about the answer's form (type, shape, dtype, device)."""
    return any(k in diff for k in (" has shape ", " has dtype ", " is on ", "; expected a "))


def diagnose(ex: Exercise, fn: Callable, case: Case, got: Any) -> str:
    """The hint of the first planted mistake that reproduces `got` on `case`, else the general one."""
    for mistake in ex.mistakes:
        try:
            wrong = _call(mistake.wrong, case)
        except Exception:          # a mistake that cannot run on this input explains nothing
            continue
        if _same(ex, got, wrong) is None:
            return mistake.hint
    return ex.hint


@dataclass
class Report:
    name: str
    passed: bool
    message: str
    written: bool = True


def run_check(name: str, fn: Callable | None) -> Report:
    """Check `fn` against exercise `name` without printing or raising (tests use this)."""
    if name not in EXERCISES:
        raise KeyError(f"no exercise named {name!r}; there are: {', '.join(sorted(EXERCISES))}")
    ex = EXERCISES[name]
    if fn is None or not callable(fn):
        return Report(name, False, f"{name}: expected a function, got {fn!r}. Define it in the cell above "
                                   "and run that cell first.", written=fn is not None)
    largest = 0.0
    cases = ex.cases()
    for case in cases:
        expected = _call(ex.reference, case)
        try:
            got = _call(fn, case)
        except NotImplementedError:
            return Report(name, False, f"{name}: not written yet. Replace `raise NotImplementedError()` in the "
                                       "cell above with your code, run that cell, then this one.", written=False)
        except Exception as exc:   # the learner's error, reported in plain words
            return Report(name, False, f"{name}: for {case.label}, your function raised "
                                       f"{type(exc).__name__}: {exc}".rstrip())
        diff = _same(ex, got, expected)
        if diff is not None:
            hint = diagnose(ex, fn, case, got)
            if hint == ex.hint and _is_form(diff):
                hint = ""          # a wrong type or shape says enough; the general hint is about values
            return Report(name, False, f"{name}: for {case.label}, {diff}." + (f" Hint: {hint}" if hint else ""))
        largest = max(largest, _largest(got, expected))
    tail = f" (largest difference {largest:.2g})" if largest else ""
    return Report(name, True, f"{name}: right on all {len(cases)} inputs{tail}.")


def check(name: str, fn: Callable | None, *, save: bool = True) -> None:
    """Check your function for exercise `name`; print the verdict; raise if it is not right yet
    (returns nothing, so a notebook cell shows only the verdict; `run_check` returns the Report).

    A right answer to an exercise the capstone uses is saved as source to `my_sd/NAME.py`
    (the folder in $SDLEARN_MY_SD, else `my_sd` in the current folder)."""
    report = run_check(name, fn)
    print(("✓ " if report.passed else "✗ " if report.written else "… ") + report.message)
    if not report.passed:
        raise (ExerciseFailed if report.written else NotWrittenYet)(report.message)
    ex = EXERCISES[name]
    if save and ex.capstone:
        path = save_source(name, fn)
        if path is not None:
            try:
                shown = path.relative_to(Path.cwd())      # "my_sd/x.py": the same in every checkout
            except ValueError:
                shown = path
            print(f"  saved to {shown} for the capstone (notebook 06)")


# ------------------------------------------------------------------------------ saved answers

def saved_folder() -> Path:
    return Path(os.environ.get(ENV_FOLDER) or Path.cwd() / "my_sd")


def save_source(name: str, fn: Callable) -> Path | None:
    """Write fn's source (and the imports it is likely to need) to my_sd/NAME.py. None when the
    source cannot be found (a function typed at a console, a lambda in a list)."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    folder = saved_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    # The modules the function uses by a global name (np, F, math, …), imported under that name;
    # helper functions of the notebook are not saved: write the answer self-contained.
    modules = {n: v.__name__ for n, v in getattr(fn, "__globals__", {}).items()
               if n in fn.__code__.co_names and isinstance(v, types.ModuleType)
               and (n, v.__name__) not in {("math", "math"), ("torch", "torch"), ("F", "torch.nn.functional")}}
    imports = "".join(f"import {m}\n" if m == n else f"import {m} as {n}\n" for n, m in sorted(modules.items()))
    header = (f'"""Your {name}, saved by sdlearn.exercises.check when it passed. Edit it in the notebook,\n'
              f'not here: the next right answer replaces this file."""\n'
              "import math\n\nimport torch\nimport torch.nn.functional as F\n" + imports + "\n")
    path.write_text(header + source.replace(f"def {fn.__name__}(", f"def {name}(", 1))
    return path


def load_saved(folder: str | os.PathLike | None = None) -> dict[str, Callable]:
    """The functions saved by `check` in `folder` (default `saved_folder()`), by exercise name."""
    folder = Path(folder) if folder is not None else saved_folder()
    found = {}
    for path in sorted(folder.glob("*.py")) if folder.is_dir() else []:
        if path.stem not in EXERCISES:
            continue
        namespace: dict[str, Any] = {"__name__": f"my_sd.{path.stem}"}
        exec(compile(path.read_text(), str(path), "exec"), namespace)   # the learner's own code, written by check()
        if callable(namespace.get(path.stem)):
            found[path.stem] = namespace[path.stem]
    return found
