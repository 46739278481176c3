"""tools/mutation.py (`make mutation`) on a two-function project, so that the script cannot rot
unnoticed: it must run every mutant, tell killed from survived, and say which survived where.

    def double(x):
        return x * 2          tested only with double(2) == 4

Of its mutants, `x + 2` and `x ** 2` also give 4 at x = 2 and survive; `x - 2`, `x / 2`,
`x // 2`, `x % 2`, `x * 3` and `x * 1` are killed; `x >> 2` and the other bitwise
replacements are left out by rule, and so is the `1 + 1` inside `check`'s error message.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import mutation  # noqa: E402

TINY = '''\
def double(x):
    return x * 2


def check(x):
    if x is None:
        raise ValueError(f"x must be a number, got {1 + 1} Nones")
    return x
'''

TEST = '''\
import pytest

from pkg.tiny import check, double


def test_double():
    assert double(2) == 4


def test_check():
    assert check(3) == 3
    with pytest.raises(ValueError):
        check(None)
'''


def test_score_and_survivors_of_a_tiny_module(tmp_path):
    project = tmp_path / "project"
    (project / "pkg").mkdir(parents=True)
    (project / "tests").mkdir()
    (project / "pkg" / "__init__.py").write_text("")
    (project / "pkg" / "tiny.py").write_text(TINY)
    (project / "tests" / "test_tiny.py").write_text(TEST)

    # No third-party pytest plugins in the mutants' test runs (nbval, hypothesis, … take a second
    # to load each time): this test runs ten of them.
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    command = [sys.executable, str(REPO / "tools" / "mutation.py"), "--root", str(project),
               "--workdir", str(tmp_path / "work"), "--target", "pkg/tiny.py=tests/test_tiny.py",
               "--sample", "100", "--seed", "1"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    log = out.stdout
    assert "10 of 10 mutants" in log, log + out.stderr
    for name in ("Sub", "Div", "FloorDiv", "Mod"):
        assert f"killed   pkg/tiny.py:2  ReplaceBinaryOperator_Mul_{name} " in log, log
    assert log.count("killed   pkg/tiny.py:2  NumberReplacer ") == 2, log         # x * 3, x * 1
    assert "killed   pkg/tiny.py:6  AddNot " in log, log                           # if not x is None
    assert "survivors (2):\n" \
           "  pkg/tiny.py:2  ReplaceBinaryOperator_Mul_Add:  return x * 2  →  return x + 2\n" \
           "  pkg/tiny.py:2  ReplaceBinaryOperator_Mul_Pow:  return x * 2  →  return x ** 2\n" in log, log
    assert "10 bitwise replacement of arithmetic, 10 error message" in log, log    # x >> 2; 1 + 1 in the message
    assert "mutation score: 8 / 10 killed = 80.0 %" in log, log
    assert out.returncode == 1, log                                               # under the 90 % default
    assert (project / "pkg" / "tiny.py").read_text() == TINY                      # the copy was mutated

    # A test that pins double down; then only the two survivors run again, and die.
    (project / "tests" / "test_tiny.py").write_text(TEST + "\n\ndef test_double_3():\n    assert double(3) == 6\n")
    again = subprocess.run(command + ["--survivors"], capture_output=True, text=True, timeout=60, env=env)
    assert "the 2 survivors of the last run:" in again.stdout, again.stdout + again.stderr
    assert "mutation score: 2 / 2 killed = 100.0 %" in again.stdout and again.returncode == 0, again.stdout


def test_rules_leave_out_annotations_messages_and_docstrings():
    source = textwrap.dedent('''\
        """Module docstring."""
        import warnings
        def f(a: int | None = None, b=1) -> int | str:
            """Docstring."""
            c: int | None = a
            if b > 1:
                raise ValueError(f"b is {b - 1} too many")
            warnings.warn(f"ø {b + 1}", stacklevel=2)
            return b - 1
        ''')
    spans = mutation.protected_spans(source)
    rule = lambda line, col: mutation.excluded_by_rule("core/NumberReplacer", (line, col), (line, col + 1), spans)
    lines = source.splitlines()
    col = lambda line, text: lines[line - 1].index(text)
    assert rule(3, col(3, "|")) == "annotation"                     # a parameter's
    assert rule(3, col(3, "| str")) == "annotation"                 # the return's
    assert rule(5, col(5, "|")) == "annotation"                     # an annotated assignment's
    assert rule(7, col(7, "-")) == "error message"
    assert rule(8, col(8, "+")) == "warning message"                # after a non-ASCII character
    assert rule(8, col(8, "2")) == "warning message"
    assert rule(6, col(6, ">")) is None                             # the condition counts
    assert rule(9, col(9, "-")) is None                             # and so does the result
    assert mutation.excluded_by_rule("core/ReplaceBinaryOperator_Sub_BitXor", (9, 13), (9, 14), spans) \
        == "bitwise replacement of arithmetic"
    assert mutation.excluded_by_rule("core/ReplaceBinaryOperator_BitOr_Add", (9, 13), (9, 14), spans) is None


def test_sample_is_seeded_and_split_half_evenly_half_by_size():
    assert mutation.allocate({"a": 1000, "b": 100, "c": 100}, 60) == {"a": 35, "b": 13, "c": 12}
    assert mutation.allocate({"a": 1000, "b": 5}, 40) == {"a": 35, "b": 5}        # b has only 5
    mutants = {m: [mutation.Mutant(m, f"{m}{i}", "op", i, (i, 0), (i, 1)) for i in range(50)] for m in "ab"}
    first, again = mutation.draw(mutants, 20, seed=3), mutation.draw(mutants, 20, seed=3)
    assert [m.job_id for m in first] == [m.job_id for m in again]
    assert [m.job_id for m in first] != [m.job_id for m in mutation.draw(mutants, 20, seed=4)]
    assert sum(m.module == "a" for m in first) == 10
