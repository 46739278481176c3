"""A training run's log: one JSON object per line in RUN/log.jsonl, and the few-KB history
condensed from it that ships next to the model it trained (notebook 08 plots it).

    append_log(run, {"stage": "vae", "step": 10, "loss": 0.31, "l1": 0.2, …})   # the training loop
    read_log(run)                                  # → [{…}, {…}, …]
    training_history(read_log(run), every=100)    # → {"every", "stages", "measure", "eval"}
    write_training_history(run)                    # → sdlearn/data/tiny_training_log.json
    read_training_history()                        # the tiny model's, as the notebooks read it

Three kinds of record: losses ({"stage", "step", "loss", its terms, "grad_norm", "lr",
"sec_per_step"}), the VAE's measurements ({"stage", "step", "measure": {…}}) and the
evaluations ({"stage", "step", "eval": {guidance: scores}}).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_HISTORY = Path(__file__).resolve().parent / "data" / "tiny_training_log.json"
NOT_LOSSES = ("stage", "step", "grad_norm", "lr", "sec_per_step")   # the loss records' other fields


def append_log(run: str | Path, record: dict[str, Any]) -> None:
    """One record → one line at the end of the run's log.jsonl."""
    with open(Path(run) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(run: str | Path) -> list[dict[str, Any]]:
    """The run's log.jsonl as a list of dicts (losses per log step, evaluations)."""
    path = Path(run) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def training_history(log: list[dict[str, Any]], every: int = 100) -> dict[str, Any]:
    """A run's log (`read_log`) condensed to a few KB, to ship next to the model it trained.

    Per stage: the loss terms averaged over windows of `every` steps (the window ending at step
    s holds steps s − every + 1 … s), and the training time Σ sec_per_step · (steps since the
    previous record) in minutes. Evaluations and VAE measurements are kept whole. A step logged
    twice (a run resumed from a checkpoint older than its last log line) counts once: its last record.

        {"every": 100, "stages": {"vae": {"step": [100, 200, …], "loss": […], "l1": […], …,
                                          "minutes": 51.3}, "unet": {…}},
         "measure": [{"step": 1500, "l1": …, "scaling_factor": …}, …],
         "eval": [{"step": 1000, "guidance": {"5.0": {"colour": …, …}, "1.0": {…}}}, …]}
    """
    last: dict[tuple[str, int], dict[str, Any]] = {}
    history: dict[str, Any] = {"every": every, "stages": {}, "measure": [], "eval": []}
    for record in log:
        if "loss" in record:
            last[(record["stage"], record["step"])] = record
        elif "measure" in record:
            history["measure"].append({"step": record["step"], **record["measure"]})
        elif "eval" in record:
            history["eval"].append({"step": record["step"], "guidance": record["eval"]})
    for stage in dict.fromkeys(stage for stage, _ in last):
        records = sorted((r for (s, _), r in last.items() if s == stage), key=lambda r: r["step"])
        names = [k for k in records[0] if k not in NOT_LOSSES]
        windows: dict[int, list[dict[str, Any]]] = {}
        for r in records:
            windows.setdefault(-(-r["step"] // every) * every, []).append(r)
        steps = [0] + [r["step"] for r in records]
        seconds = sum(r["sec_per_step"] * (step - before) for r, step, before in zip(records, steps[1:], steps))
        history["stages"][stage] = {"step": list(windows), **{
            k: [round(sum(r[k] for r in rs) / len(rs), 6) for rs in windows.values()] for k in names},
            "minutes": round(seconds / 60, 1)}
    return history


def write_training_history(run: str | Path, path: str | Path = TINY_HISTORY, every: int = 100) -> Path:
    """`training_history` of the run folder's log.jsonl → a JSON file (by default the one shipped
    with the tiny model, which the notebooks plot since run folders are not committed)."""
    history = training_history(read_log(run), every)
    if not history["stages"]:
        raise FileNotFoundError(f"{Path(run) / 'log.jsonl'} holds no training records; pass the run folder")
    path = Path(path)
    path.write_text(json.dumps(history, separators=(",", ":")) + "\n")
    return path


def read_training_history(path: str | Path = TINY_HISTORY) -> dict[str, Any]:
    """The history `write_training_history` wrote (by default the tiny model's)."""
    return json.loads(Path(path).read_text())
