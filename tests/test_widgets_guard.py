"""ipywidgets is optional: without it the explorer and `interact` show the static figure with a note."""
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from checkpoints import original_file  # noqa: E402
from sdlearn import load_pipeline, widgets  # noqa: E402
from sdlearn.configs import ModelConfig  # noqa: E402

PROMPT = "a large red circle on the left"


@pytest.fixture
def no_ipywidgets(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)        # `import ipywidgets` now raises ImportError
    assert widgets.ipywidgets_or_none() is None


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_pipeline(original_file(ModelConfig.tiny()), "cpu", torch.float32)
    torch.set_num_threads(threads)


def drawing(calls):
    def show(t=7, schedule="linear"):
        calls.append((t, schedule))
        fig, ax = plt.subplots()
        ax.plot([0, t])
        return fig
    return show


def test_the_explorer_shows_the_static_figure_with_a_note_without_ipywidgets(pipe, no_ipywidgets, capsys):
    ex = widgets.GuidanceExplorer(pipe)
    before = plt.get_fignums()
    fig = ex.widget(PROMPT, guidance=3.0, steps=2, seed=0, word="red")
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and "ipywidgets is not installed" in out and "guidance 3, 2 steps, seed 0, word 'red'" in out
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 2 and "'red'" in fig.axes[1].get_title()
    assert plt.get_fignums() == before             # handed to the cell once, not left for pyplot to show again
    assert ex.runs == 1
    fig = ex.widget(PROMPT, guidance=3.0, steps=2, seed=0)           # no word: the last one, as the widget picks
    assert "word 'left'" in capsys.readouterr().out and "'left'" in fig.axes[1].get_title() and ex.runs == 1


def test_interact_calls_the_function_once_with_its_defaults_without_ipywidgets(no_ipywidgets, capsys):
    calls = []
    fig = widgets.interact(drawing(calls), t=(0, 999, 1), schedule=["cosine", "linear"])
    assert calls == [(7, "linear")] and isinstance(fig, matplotlib.figure.Figure)
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and "t = 7, schedule = 'linear'" in out and "pip install ipywidgets" in out
    calls.clear()
    widgets.interact(lambda t, kind: calls.append((t, kind)), t=(0, 10), kind=["a", "b"])
    assert calls == [(5, "a")]                     # no defaults: the slider's middle, the list's first item


def test_interact_makes_sliders_that_update_on_release_with_ipywidgets():
    W = pytest.importorskip("ipywidgets")
    calls = []
    box = widgets.interact(drawing(calls), t=(0, 999, 1), schedule=["cosine", "linear"])
    assert isinstance(box, W.interactive)
    t, schedule = box.children[:2]
    assert isinstance(t, W.IntSlider) and (t.min, t.max, t.value, t.continuous_update) == (0, 999, 7, False)
    assert isinstance(schedule, W.Dropdown) and schedule.value == "linear"
    t.value = 500
    assert calls[-1] == (500, "linear")
    assert isinstance(box.result, matplotlib.figure.Figure) and box.result.number not in plt.get_fignums()
    plt.close("all")
