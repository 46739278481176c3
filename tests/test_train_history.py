"""The compact training history shipped with the tiny model, and the alignment plot notebook 08 draws from it."""
import json

import matplotlib
import pytest

matplotlib.use("Agg")

from sdlearn import runlog, train, viz  # noqa: E402
from sdlearn.sources import TINY_PATH  # noqa: E402
from sdlearn.safetensors_file import SafetensorsFile  # noqa: E402


def _loss(stage, step, loss, sec=0.5, **parts):
    return {"stage": stage, "step": step, "loss": loss, **parts, "grad_norm": 1.0, "lr": 1e-3, "sec_per_step": sec}


LOG = [
    _loss("vae", 10, 4.0, l1=2.0), _loss("vae", 20, 2.0, l1=1.0),
    _loss("vae", 30, 9.0, l1=9.0),                        # overwritten below: the run was resumed from step 20
    _loss("vae", 30, 1.0, l1=0.5, sec=2.0),
    {"stage": "vae", "step": 30, "measure": {"l1": 0.1, "scaling_factor": 0.7}},
    _loss("unet", 10, 0.9), _loss("unet", 20, 0.5),
    {"stage": "unet", "step": 20, "eval": {"5.0": {"colour": 0.9}, "1.0": {"colour": 0.6}}},
]


def test_history_averages_losses_per_window_and_keeps_the_last_record_of_a_step():
    history = runlog.training_history(LOG, every=20)
    vae = history["stages"]["vae"]
    assert vae["step"] == [20, 40]
    assert vae["loss"] == [3.0, 1.0] and vae["l1"] == [1.5, 0.5]
    assert "grad_norm" not in vae and "lr" not in vae and "sec_per_step" not in vae
    assert vae["minutes"] == pytest.approx(round((10 * 0.5 + 10 * 0.5 + 10 * 2.0) / 60, 1))
    assert history["stages"]["unet"]["step"] == [20] and history["stages"]["unet"]["loss"] == [0.7]
    assert history["measure"] == [{"step": 30, "l1": 0.1, "scaling_factor": 0.7}]
    assert history["eval"] == [{"step": 20, "guidance": {"5.0": {"colour": 0.9}, "1.0": {"colour": 0.6}}}]


def test_history_round_trips_through_a_run_folder_and_refuses_an_empty_one(tmp_path):
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LOG))
    path = runlog.write_training_history(tmp_path, tmp_path / "h.json", every=10)
    assert runlog.read_training_history(path) == json.loads(json.dumps(runlog.training_history(LOG, 10)))
    with pytest.raises(FileNotFoundError, match="no training records"):
        runlog.write_training_history(tmp_path / "nothing", tmp_path / "x.json")


def test_cli_writes_the_history(tmp_path):
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LOG))
    assert train.main(["history", str(tmp_path), str(tmp_path / "h.json"), "--every", "20"]) == 0
    assert runlog.read_training_history(tmp_path / "h.json")["stages"]["vae"]["step"] == [20, 40]


@pytest.mark.skipif(not TINY_PATH.exists(), reason="the tiny model is not in this checkout")
def test_shipped_history_belongs_to_the_shipped_model():
    history = runlog.read_training_history()
    training = json.loads(SafetensorsFile(TINY_PATH).metadata["sdlearn_training"])
    assert history["stages"]["vae"]["step"][-1] == training["vae_steps"]
    assert history["stages"]["unet"]["step"][-1] == training["unet_steps"]
    assert history["eval"][-1]["step"] == training["unet_steps"]
    assert runlog.TINY_HISTORY.stat().st_size < 20_000


def test_plot_alignment_draws_one_line_per_attribute_and_series():
    series = {"g = 5": {2000: {"colour": 1.0, "shape": 0.5, "position": 0.25},
                        1000: {"colour": 0.5, "shape": 0.25, "position": 0.0}},
              "g = 1": {1000: {"colour": 0.1, "shape": 0.2, "position": 0.3}}}
    fig = viz.plot_alignment(series, xlabel="step")
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    assert list(lines) == [f"{a}, {s}" for s in series for a in ("colour", "shape", "position")]
    assert list(lines["shape, g = 5"].get_xdata()) == [1000, 2000]          # sorted by x
    assert list(lines["shape, g = 5"].get_ydata()) == [25.0, 50.0]          # in percent
    assert lines["colour, g = 1"].get_linestyle() == "--" and lines["colour, g = 5"].get_linestyle() == "-"
    assert fig.axes[0].get_xlabel() == "step"
    with pytest.raises(ValueError, match="at most 4"):
        viz.plot_alignment({str(i): {} for i in range(5)}, xlabel="x")
