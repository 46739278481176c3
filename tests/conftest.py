import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Parity tests compare float32 results; keep them deterministic and off any GPU.
os.environ.setdefault("SDLEARN_DEVICE", "cpu")
torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def _float32_default():
    assert torch.get_default_dtype() == torch.float32
    yield


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny-model tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models gain nothing from a second thread, and on a busy shared 2-core machine OpenMP's
    spinning threads stall each step for seconds (2 min for test_pipeline.py instead of 20 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the student editions, run in the background (tests/student_run.py, tests/test_student_editions.py)

STUDENT_TESTS = "test_student_editions.py"


def _wants_student_run(items) -> bool:
    return any(Path(str(item.fspath)).name == STUDENT_TESTS for item in items)


def pytest_collection_modifyitems(session, config, items):
    """The student-edition tests go last: they wait for the background run started below."""
    late = [item for item in items if Path(str(item.fspath)).name == STUDENT_TESTS]
    if late:
        items[:] = [item for item in items if Path(str(item.fspath)).name != STUDENT_TESTS] + late


def pytest_collection_finish(session):
    """Start executing every student edition in a low-priority background process as soon as the
    session knows it will check them, so they run beside the (mostly one-thread) suite."""
    if session.config.option.collectonly or not _wants_student_run(session.items):
        return
    import student_run                            # here: only sessions that run its tests need nbformat
    out = Path(tempfile.mkdtemp(prefix="sdlearn-student-run-"))
    log = open(out / "log.txt", "w")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "student_run.py"), str(out)],
                            env=student_run.kernel_env(out), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True,             # its own process group, kernels included
                            preexec_fn=lambda: os.nice(10))     # the suite's own tests come first
    session.config._sdlearn_student_run = (proc, out, log)


def pytest_sessionfinish(session, exitstatus):
    run = getattr(session.config, "_sdlearn_student_run", None)
    if run is None:
        return
    proc, out, log = run
    if proc.poll() is None:                       # the session stopped early (-x, Ctrl-C): stop it and its kernel
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    shutil.rmtree(out, ignore_errors=True)
