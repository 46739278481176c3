import os
import shutil
import subprocess
import sys
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


def _is_student_test(item) -> bool:
    return item.path.name == STUDENT_TESTS


def _student_notebooks(items) -> list[str]:
    """The notebooks whose student edition the selected tests read (parametrised by `path`)."""
    return sorted({item.callspec.params["path"].name for item in items
                   if _is_student_test(item) and "executed" in item.fixturenames and hasattr(item, "callspec")})


def start_student_run(config, names: list[str]):
    """Start tests/student_run.py on `names` (low priority: it lowers its own), once per session."""
    import student_run                            # here: only sessions that check student editions need nbformat
    config._sdlearn_student_run = student_run.start_in_background(names)
    return config._sdlearn_student_run


def pytest_collection_modifyitems(session, config, items):
    """The student-edition tests go last: they wait for the background run started below."""
    late = [item for item in items if _is_student_test(item)]
    if late:
        items[:] = [item for item in items if not _is_student_test(item)] + late


def pytest_collection_finish(session):
    """Start executing the selected student editions in a background process as soon as the session
    knows it will check them, so they run beside the (mostly one-thread) suite. Not in a pytest-xdist
    worker: there the `executed` fixture starts the run itself when first needed."""
    names = _student_notebooks(session.items)
    if session.config.option.collectonly or not names or hasattr(session.config, "workerinput"):
        return
    start_student_run(session.config, names)


def pytest_sessionfinish(session, exitstatus):
    run = getattr(session.config, "_sdlearn_student_run", None)
    if run is None:
        return
    proc, out, log = run
    if proc.poll() is None:                       # the session stopped early (-x, Ctrl-C): stop it;
        proc.terminate()                          # it shuts its kernel down on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()
    if exitstatus == 0 or proc.returncode != 0 and not (out / "executed" / "DONE").exists():
        shutil.rmtree(out, ignore_errors=True)
    else:                                         # a failed session keeps what the student run wrote
        print(f"\nthe executed student editions are kept in {out}")
