"""Mutation testing of sdlearn's core: do the tests fail when the code is wrong?

    python tools/mutation.py                       # 200 mutants, seed 0   (make mutation)
    python tools/mutation.py --sample 40 --modules schedule,attention
    python tools/mutation.py --list                # show the sample, run nothing
    python tools/mutation.py --survivors           # only the last run's survivors (after new tests)

A mutant is the source with one small change (`+` → `-`, `<` → `<=`, `1` → `2`, `if c` →
`if not c`, a loop that never runs, …). It is *killed* when the tests of its module fail (or
run past the timeout) and *survives* when they pass: then no test pins down what that piece of
code does. The score is killed / run.

Cosmic Ray (`cosmic_ray`, a test dependency) makes the mutants: its `init` lists every
mutation its operators can make in a module, and its `mutate_and_test` writes one into the file,
runs a test command and puts the file back. This script adds what the issue asks for on top:

1. A copy of the repository, `tree/` under `--workdir` (default .cache/mutation), is what gets
   mutated; the working tree is never touched, and the tests import sdlearn from the copy.
2. Each module is tested by its own fast test files (`MODULE_TESTS`, tests of `make test`,
   run with `-m "not full"` and `-x`). Their unmutated run must pass first (the baseline); its
   time sets the per-mutant timeout (`--timeout`, default 3 × baseline + 10 s).
3. Mutants that cannot change behaviour are excluded by rule, never by hand (`excluded_by_rule`):
   mutations inside type annotations (never evaluated: every module has
   `from __future__ import annotations`), inside the exception of a `raise` statement or the
   arguments of `warnings.warn(...)` (the wording and numbers of an error or warning message,
   not whether it is raised: conditions stay in), and inside docstrings.
   And by a choice of operators (`--all-operators` turns it off): an arithmetic operator is not
   replaced by a shift or bitwise one (`>>`, `<<`, `&`, `|`, `^`). On float tensors these raise a
   TypeError on the first call, so any test that reaches the line kills them; cosmic-ray makes
   five per arithmetic operator, nearly a third of all mutants, and they would only inflate the score.
4. A seeded sample (`--sample`, `--seed`): half of it split evenly over the modules, half in
   proportion to how many mutants each has, then drawn at random within each module.
5. One mutant at a time, the test process limited to one thread (the machine is shared). The
   results go into a Cosmic Ray session per module (`<workdir>/<module>.sqlite`; `cr-report`
   reads it) and are printed: every survivor with file:line and the change.

The exit status is 1 when the score is under `--fail-under` (default 90 %).
"""
from __future__ import annotations

import argparse
import ast
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each core module and the test files that specify it (all part of `make test`).
MODULE_TESTS: dict[str, list[str]] = {
    "sdlearn/schedule.py": ["tests/test_schedule.py", "tests/test_samplers.py"],
    "sdlearn/samplers.py": ["tests/test_samplers.py"],
    "sdlearn/attention.py": ["tests/test_attention.py", "tests/test_attention_maps.py", "tests/test_clip.py"],
    "sdlearn/clip.py": ["tests/test_clip.py"],
    "sdlearn/unet.py": ["tests/test_unet.py"],
    "sdlearn/vae.py": ["tests/test_vae.py"],
    "sdlearn/tokenizer.py": ["tests/test_tokenizer.py"],
}

# What is not copied into the scratch tree (besides the work folder itself).
IGNORED = (".git", ".venv", "venv", ".cache", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info",
           "build", "dist", "runs", ".ipynb_checkpoints")
BITWISE = ("RShift", "LShift", "BitOr", "BitAnd", "BitXor")
ARITHMETIC = ("Add", "Sub", "Mul", "Div", "FloorDiv", "Mod", "Pow", "MatMul")


# ---- which mutants count ----------------------------------------------------------------------

def _span(node: ast.AST, lines: list[str]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(start, end) of an ast node as (line, column) in characters, as cosmic-ray's parso counts
    them (ast counts columns in UTF-8 bytes)."""
    def char_col(line: int, byte_col: int) -> int:
        return len(lines[line - 1].encode("utf-8")[:byte_col].decode("utf-8", errors="replace"))
    return ((node.lineno, char_col(node.lineno, node.col_offset)),
            (node.end_lineno, char_col(node.end_lineno, node.end_col_offset)))


def _is_warn(func: ast.AST) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "warn" and isinstance(func.value, ast.Name)
            and func.value.id == "warnings") or (isinstance(func, ast.Name) and func.id == "warn")


def protected_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int], str]]:
    """The regions of `source` where a mutation cannot change what the code does, with the rule."""
    lines = source.splitlines()
    spans = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            spans.append((*_span(node.exc, lines), "error message"))
        elif isinstance(node, ast.Call) and _is_warn(node.func):
            spans.append((*_span(node, lines), "warning message"))
        elif isinstance(node, ast.arg) and node.annotation is not None:
            spans.append((*_span(node.annotation, lines), "annotation"))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            spans.append((*_span(node.returns, lines), "annotation"))
        elif isinstance(node, ast.AnnAssign):
            spans.append((*_span(node.annotation, lines), "annotation"))
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                spans.append((*_span(first, lines), "docstring"))
    return spans


def excluded_by_rule(operator: str, start, end, spans, all_operators: bool = False) -> str | None:
    """Why a mutation is left out of the sample, or None if it counts."""
    op = operator.split("/")[-1]
    if not all_operators and op.startswith("ReplaceBinaryOperator_"):
        _, old, new = op.split("_")
        if old in ARITHMETIC and new in BITWISE:
            return "bitwise replacement of arithmetic"
    for s, e, rule in spans:
        if s <= tuple(start) and tuple(end) <= e:
            return rule
    return None


# ---- the sample -------------------------------------------------------------------------------

@dataclass
class Mutant:
    module: str                   # relative path, e.g. "sdlearn/schedule.py"
    job_id: str
    operator: str
    occurrence: int
    start: tuple[int, int]
    end: tuple[int, int]
    outcome: str = "pending"      # killed, timeout, survived, error
    change: str = ""              # "old line → new line"
    seconds: float = 0.0


def allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """How many of `n` mutants to draw from each module: half split evenly, half in proportion to
    the module's number of mutants (largest remainders), never more than a module has."""
    share = {m: n / 2 / len(sizes) + n / 2 * k / max(sum(sizes.values()), 1) for m, k in sizes.items()}
    counts = {m: int(s) for m, s in share.items()}
    for m in sorted(share, key=lambda m: share[m] - counts[m], reverse=True)[:n - sum(counts.values())]:
        counts[m] += 1
    # A module with fewer mutants than its share gives the rest to the others, in order of size.
    spare = sum(max(counts[m] - sizes[m], 0) for m in sizes)
    counts = {m: min(counts[m], sizes[m]) for m in sizes}
    for m in sorted(sizes, key=lambda m: sizes[m] - counts[m], reverse=True):
        take = min(spare, sizes[m] - counts[m])
        counts[m] += take
        spare -= take
    return counts


def enumerate_mutants(tree: Path, modules: list[str], workdir: Path, all_operators: bool):
    """Cosmic Ray's full list of mutants per module, as sessions in `workdir`; returns
    {module: [Mutant]} of those that count and {rule: number} of those excluded."""
    from cosmic_ray.commands.init import init
    from cosmic_ray.work_db import use_db

    eligible, excluded = {}, {}
    for module in modules:
        path = tree / module
        spans = protected_spans(path.read_text(encoding="utf-8"))
        session = workdir / (Path(module).stem + ".sqlite")
        session.unlink(missing_ok=True)
        with use_db(str(session)) as db:
            init([path], db, {})
            items = list(db.work_items)
        eligible[module] = []
        for item in items:
            (m,) = item.mutations
            rule = excluded_by_rule(m.operator_name, m.start_pos, m.end_pos, spans, all_operators)
            if rule:
                excluded[rule] = excluded.get(rule, 0) + 1
            else:
                eligible[module].append(Mutant(module, item.job_id, m.operator_name, m.occurrence,
                                               tuple(m.start_pos), tuple(m.end_pos)))
        eligible[module].sort(key=lambda mu: (mu.start, mu.operator, mu.occurrence))
    return eligible, excluded


def previous_survivors(workdir: Path, modules: list[str]) -> set[tuple]:
    """(module, operator, occurrence, start) of every mutant that survived the last run."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome

    found = set()
    for module in modules:
        session = workdir / (Path(module).stem + ".sqlite")
        if session.exists():
            with use_db(str(session), WorkDB.Mode.open) as db:
                for item, result in db.completed_work_items:
                    if result.test_outcome == TestOutcome.SURVIVED:
                        (m,) = item.mutations
                        found.add((module, m.operator_name, m.occurrence, tuple(m.start_pos)))
    return found


def draw(eligible: dict[str, list[Mutant]], n: int, seed: int) -> list[Mutant]:
    rng = random.Random(seed)
    counts = allocate({m: len(v) for m, v in eligible.items()}, n)
    sample = []
    for module in eligible:                          # a fixed order: the same seed, the same sample
        picked = rng.sample(eligible[module], counts[module])
        sample += sorted(picked, key=lambda mu: (mu.start, mu.operator, mu.occurrence))
    return sample


# ---- running ----------------------------------------------------------------------------------

def copy_tree(root: Path, tree: Path) -> None:
    if tree.exists():
        shutil.rmtree(tree)
    workdir_parts = {tree.parent.resolve()}
    ignore_names = shutil.ignore_patterns(*IGNORED)

    def ignore(folder, names):
        skipped = set(ignore_names(folder, names))
        return skipped | {n for n in names if (Path(folder) / n).resolve() in workdir_parts}

    shutil.copytree(root, tree, ignore=ignore, symlinks=True)
    if (root / ".cache" / "tests").is_dir():         # the parity tests' cached references
        shutil.copytree(root / ".cache" / "tests", tree / ".cache" / "tests")


def test_command(tests: list[str]) -> str:
    return shlex.join([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                       "-m", "not full", *tests])


def test_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")
    return env


def reset_cache(tree: Path, snapshot: Path) -> None:
    """Every test run starts from the baseline's test cache (a mutant must not leave a cached
    file behind for the next)."""
    cache = tree / ".cache" / "tests"
    if cache.exists():
        shutil.rmtree(cache)
    if snapshot.exists():
        shutil.copytree(snapshot, cache)


def check_imports_from(tree: Path, env: dict[str, str], package: str) -> None:
    code = f"import importlib.util; print(importlib.util.find_spec({package!r}).origin)"
    origin = subprocess.run([sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True,
                            check=True).stdout.strip()
    if not Path(origin).resolve().is_relative_to(tree.resolve()):
        sys.exit(f"the tests would import {package} from {origin}, not from the mutated copy {tree}; "
                 f"is PYTHONPATH overridden, or {package} installed as a regular (non-editable) package?")


def baseline(tree: Path, module: str, tests: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    proc = subprocess.run(shlex.split(test_command(tests)), cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"the tests of {module} fail without any mutation ({' '.join(tests)}), so no mutant can "
                 f"be judged:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return seconds


def change_of(diff: str | None) -> str:
    """'old → new' from a unified diff of one mutation."""
    if not diff:
        return ""
    old = [l[1:].strip() for l in diff.splitlines() if l.startswith("-") and not l.startswith("---")]
    new = [l[1:].strip() for l in diff.splitlines() if l.startswith("+") and not l.startswith("+++")]
    return f"{' / '.join(old)}  →  {' / '.join(new)}"


def run_sample(tree: Path, sample: list[Mutant], targets: dict[str, list[str]], timeouts: dict[str, float],
               workdir: Path, snapshot: Path) -> None:
    from cosmic_ray.mutating import mutate_and_test
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import MutationSpec, WorkResult, WorkerOutcome

    os.chdir(tree)                                   # cosmic-ray runs the test command in the cwd
    os.environ.update(test_env(tree))
    width = len(str(len(sample)))
    for module in targets:
        todo = [mu for mu in sample if mu.module == module]
        session = workdir / (Path(module).stem + ".sqlite")
        with use_db(str(session)) as db:
            chosen = {mu.job_id for mu in todo}
            db.set_multiple_results([item.job_id for item in db.work_items if item.job_id not in chosen],
                                    WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output="not in the sample"))
            for mu in todo:
                reset_cache(tree, snapshot)
                spec = MutationSpec(module_path=tree / module, operator_name=mu.operator, occurrence=mu.occurrence,
                                    start_pos=mu.start, end_pos=mu.end)
                start = time.monotonic()
                result = mutate_and_test([spec], test_command(targets[module]), timeouts[module])
                mu.seconds = time.monotonic() - start
                db.set_result(mu.job_id, result)
                mu.change = change_of(result.diff)
                if result.worker_outcome != WorkerOutcome.NORMAL or result.test_outcome == "incompetent":
                    mu.outcome = "error"
                    lines = (result.output or "").strip().splitlines()
                    mu.change = mu.change or (lines[-1] if lines else str(result.worker_outcome))
                elif result.test_outcome == "killed":
                    mu.outcome = "timeout" if result.output == "timeout" else "killed"
                else:
                    mu.outcome = "survived"
                done = sample.index(mu) + 1
                print(f"[{done:>{width}}/{len(sample)}] {mu.outcome:<8} {module}:{mu.start[0]}  {mu.operator.split('/')[-1]}"
                      f"  ({mu.seconds:.0f} s)", flush=True)


# ---- the report -------------------------------------------------------------------------------

def report(sample: list[Mutant], excluded: dict[str, int], wall: float) -> float:
    run = [mu for mu in sample if mu.outcome in ("killed", "timeout", "survived")]
    killed = [mu for mu in run if mu.outcome != "survived"]
    print("\nscore per module (killed / run):")
    for module in dict.fromkeys(mu.module for mu in sample):
        mine = [mu for mu in run if mu.module == module]
        k = sum(mu.outcome != "survived" for mu in mine)
        t = sum(mu.outcome == "timeout" for mu in mine)
        print(f"  {module:<24} {k:>4} / {len(mine):<4}" + (f"  ({t} by timeout)" if t else ""))
    errors = [mu for mu in sample if mu.outcome == "error"]
    if errors:
        print(f"\n{len(errors)} mutant(s) could not be run (not counted):")
        for mu in errors:
            print(f"  {mu.module}:{mu.start[0]}  {mu.operator}  {mu.change}")
    survivors = [mu for mu in run if mu.outcome == "survived"]
    if survivors:
        print(f"\nsurvivors ({len(survivors)}):")
        for mu in survivors:
            print(f"  {mu.module}:{mu.start[0]}  {mu.operator.split('/')[-1]}:  {mu.change}")
    if excluded:
        print("\nleft out by rule (not sampled): " + ", ".join(f"{n} {rule}" for rule, n in sorted(excluded.items())))
    score = len(killed) / len(run) if run else 0.0
    print(f"\nmutation score: {len(killed)} / {len(run)} killed = {100 * score:.1f} %   "
          f"(wall time {wall / 60:.1f} min)")
    return score


def parse_targets(specs: list[str]) -> dict[str, list[str]]:
    """--target MODULE=TEST[,TEST…] pairs (for other trees, and the test of this script)."""
    targets = {}
    for spec in specs:
        module, _, tests = spec.partition("=")
        if not tests:
            sys.exit(f"--target expects MODULE=TEST[,TEST...]; got {spec!r}")
        targets[module] = tests.split(",")
    return targets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", type=int, default=200, help="how many mutants to run (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample (default 0)")
    p.add_argument("--modules", help="comma-separated subset, by name: schedule,samplers,attention,clip,unet,vae,tokenizer")
    p.add_argument("--timeout", type=float, help="seconds per mutant (default: 3 × the baseline run + 10)")
    p.add_argument("--fail-under", type=float, default=90.0, help="exit 1 below this score in %% (default 90)")
    p.add_argument("--all-operators", action="store_true", help="also replace arithmetic by bitwise operators")
    p.add_argument("--list", action="store_true", help="print the sample and stop")
    p.add_argument("--survivors", action="store_true",
                   help="run again only the mutants that survived the last run (after writing tests for them)")
    p.add_argument("--root", type=Path, default=REPO, help="the project to copy (default: this repository)")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: ROOT/.cache/mutation)")
    p.add_argument("--target", action="append", default=[], metavar="MODULE=TEST[,TEST...]",
                   help="mutate MODULE against these tests instead of the core map (repeatable)")
    args = p.parse_args(argv)

    root = args.root.resolve()
    targets = parse_targets(args.target) if args.target else dict(MODULE_TESTS)
    if args.modules:
        wanted = set(args.modules.split(","))
        unknown = wanted - {Path(m).stem for m in targets}
        if unknown:
            sys.exit(f"unknown module(s) {', '.join(sorted(unknown))}; expected some of "
                     f"{', '.join(Path(m).stem for m in targets)}")
        targets = {m: t for m, t in targets.items() if Path(m).stem in wanted}
    workdir = (args.workdir or root / ".cache" / "mutation").resolve()
    tree = workdir / "tree"
    started = time.monotonic()

    workdir.mkdir(parents=True, exist_ok=True)
    copy_tree(root, tree)
    survivors = previous_survivors(workdir, list(targets)) if args.survivors else None
    eligible, excluded = enumerate_mutants(tree, list(targets), workdir, args.all_operators)
    total = sum(len(v) for v in eligible.values())
    if survivors is None:
        sample = draw(eligible, args.sample, args.seed)
        print(f"{len(sample)} of {total} mutants (seed {args.seed}; {sum(excluded.values())} more left out by rule):")
    else:
        sample = [mu for v in eligible.values() for mu in v
                  if (mu.module, mu.operator, mu.occurrence, mu.start) in survivors]
        print(f"the {len(sample)} survivors of the last run"
              + (f" ({len(survivors) - len(sample)} no longer exist: the source changed)" if len(sample) < len(survivors) else "")
              + ":")
    for module in targets:
        print(f"  {module:<24} {sum(mu.module == module for mu in sample):>4} of {len(eligible[module]):<5} "
              f"tests: {' '.join(targets[module])}")
    if args.list:
        for mu in sample:
            print(f"  {mu.module}:{mu.start[0]}  {mu.operator}")
        return 0

    env = test_env(tree)
    check_imports_from(tree, env, Path(next(iter(targets))).parts[0].removesuffix(".py"))
    timeouts = {}
    for module, tests in targets.items():
        seconds = baseline(tree, module, tests, env)
        timeouts[module] = args.timeout or 3 * seconds + 10
        print(f"baseline {module}: {seconds:.1f} s, timeout per mutant {timeouts[module]:.0f} s", flush=True)
    snapshot = workdir / "cache-baseline"
    if snapshot.exists():
        shutil.rmtree(snapshot)
    if (tree / ".cache" / "tests").exists():
        shutil.copytree(tree / ".cache" / "tests", snapshot)

    run_sample(tree, sample, targets, timeouts, workdir, snapshot)
    score = report(sample, excluded, time.monotonic() - started)
    return 0 if 100 * score >= args.fail_under else 1


if __name__ == "__main__":
    sys.exit(main())
