"""Every code block in the README runs as written.

Python blocks run in order in one fresh Python process (later blocks use what earlier ones
defined), `sdlearn` command lines one by one, both in an empty folder with the bundled tiny
model. Examples for the real SD v1.5 weights name a file the test cannot have; it puts a random
SD v1.x checkpoint of tiny size (original layout) at that path's place and runs them too.

Blocks that set the machine up (make, pip, venv, conda, the training recipe) are not run here:
`SETUP` lists the commands they may hold, and a block that mixes them with anything else fails.
The training recipe's commands are run with few steps by tests/test_train.py and, under torchrun,
tests/test_train_ddp.py.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import original_file
from sdlearn.configs import ModelConfig

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
REAL_WEIGHTS = "~/models/v1-5-pruned-emaonly.safetensors"
SETUP = ("make ", "pip ", "python -m venv", "conda ", "jupyter ", "torchrun ", "python -m sdlearn.train",
         "SDLEARN_WEIGHTS=")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """[(language, code)] of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def commands(code: str) -> list[str]:
    """The command lines of a shell block, comments dropped, continued lines (ending in \\) joined."""
    lines = [line.split(" #")[0].strip() for line in code.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def is_setup(line: str) -> bool:
    return line.startswith(SETUP)


BLOCKS = code_blocks(README.read_text())


def test_the_readme_has_the_blocks_this_test_expects():
    langs = [lang for lang, _ in BLOCKS]
    assert set(langs) <= {"python", "bash", ""}, langs
    assert langs.count("python") >= 3 and langs.count("bash") >= 4
    for lang, code in BLOCKS:
        if lang == "bash":
            lines = commands(code)
            kinds = {is_setup(line) for line in lines}
            assert len(kinds) == 1, f"a README block mixes set-up commands with examples:\n{code}"
            if kinds == {False}:
                assert all(line.startswith("sdlearn ") for line in lines), code


@pytest.fixture(scope="module")
def real_weights_stand_in() -> Path:
    return original_file(ModelConfig.tiny())


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SDLEARN_WEIGHTS"}
    return {**env, "PYTHONWARNINGS": "ignore"}


def test_python_examples_run(tmp_path, real_weights_stand_in):
    code = "\n\n".join(c for lang, c in BLOCKS if lang == "python")
    assert REAL_WEIGHTS in code
    script = tmp_path / "readme_examples.py"
    script.write_text(code.replace(REAL_WEIGHTS, str(real_weights_stand_in)))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_command_line_examples_run(tmp_path, real_weights_stand_in):
    lines = [line for lang, c in BLOCKS if lang == "bash" for line in commands(c) if not is_setup(line)]
    assert any(REAL_WEIGHTS in line for line in lines) and len(lines) >= 4
    for line in lines:
        argv = shlex.split(line.replace(REAL_WEIGHTS, str(real_weights_stand_in)))
        assert argv[0] == "sdlearn"
        proc = subprocess.run([sys.executable, "-m", "sdlearn", *argv[1:]], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
    # -o out.png -n 4 writes out-0.png … out-3.png, as the README says
    assert sorted(p.name for p in tmp_path.glob("out-*.png")) == [f"out-{i}.png" for i in range(4)]
