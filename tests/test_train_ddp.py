"""Training on two processes (torchrun, gloo) computes, step by step, what one process computes."""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from sdlearn import runlog, train
from sdlearn.configs import ModelConfig
from sdlearn.vae import AutoencoderKL

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
DATA = dict(images=32, two_shapes=0.1, seed=3)
SETTINGS = {"vae": dict(steps=STEPS, batch=4, lr=1e-3, warmup=1, log_every=1, **DATA),
            "unet": dict(steps=STEPS, batch=4, lr=1e-3, warmup=1, log_every=1, captions_per_image=2,
                         caption_dropout=0.25, eval_steps=0, **DATA)}
TOLERANCE = 1e-5


def _torchrun(stage: str, out: Path, trace: Path) -> None:
    """`torchrun --standalone --nproc_per_node 2 -m sdlearn.train STAGE …` on the CPU: two one-thread
    processes, gloo. With --device=cuda (one GPU per process) the same command uses nccl."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS[stage].items()]
    config = ["--config=micro"] if stage == "vae" else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sdlearn.train", stage, "--out", str(out), "--data-cache=", "--device=cpu", *config, *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **{train.TRACE_ENV: str(trace)})
    proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _one_process(stage: str, out: Path, trace: Path, monkeypatch) -> None:
    """The same stage in this process, with one thread like each of torchrun's processes."""
    monkeypatch.setenv(train.TRACE_ENV, str(trace))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if stage == "vae":
            train.train_vae(out, config="micro", data_cache=None, **SETTINGS[stage])
        else:
            train.train_unet(out, data_cache=None, **SETTINGS[stage])
    finally:
        torch.set_num_threads(threads)
        monkeypatch.delenv(train.TRACE_ENV)


def _weights(trace: Path, stage: str, step: int, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(trace / f"{stage}-{step}-rank{rank}.pt")


def _ignored(model: nn.Module, *inputs) -> set[str]:
    """The parameters the model's output does not depend on: in float64 their gradient (of a random
    combination of the outputs) is 0 to rounding (≤ 1e-12; every other tensor's is ≥ 1e-5)."""
    model = copy.deepcopy(model).double()
    outputs = model(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = torch.Generator().manual_seed(0)
    sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs).backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() < 1e-12}


def test_two_processes_hold_the_weights_one_process_holds_after_every_step(tmp_path, monkeypatch):
    """Three steps of each stage at micro size on two processes (torchrun, gloo, one thread each;
    the global batch of 4 split 2 + 2) and on one (the same 4 rows, one thread). After every step:

    - both processes hold identical weights, bit for bit: DDP's all-reduce hands both the same
      averaged gradient, so both take the same AdamW step;
    - they hold the one process's weights: ‖θ₂ − θ₁‖ / ‖θ₁‖ ≤ 1e-5 for each network (vae;
      text_encoder, unet) over the parameters its output depends on; measured: VAE 1e-6,
      text encoder 4e-9, UNet 3e-6;
    - the logged loss and gradient norm (before clipping) agree to 1e-5. The gradient norm catches
      what the weights cannot: gradients summed instead of averaged over the processes leave the
      weights as they are (AdamW divides the gradient by its own running size), not the norm.

    Why not every parameter: the output does not depend on a few (the VAE's conv biases just
    before a GroupNorm of one channel per group, which subtracts them again; attention key
    biases, which softmax cancels, as q·(k + b) adds the same q·b to all of a query's logits).
    Their exact gradient is 0, in float32 rounding noise of 1e-10 … 5e-8, around AdamW's
    ε = 1e-8; AdamW moves a weight by about lr·g/(|g| + ε), so it moves them by up to ±lr in a
    direction the summation order picks, and two processes sum in another order than one. Over
    every parameter the VAE's error was 3e-6, 4e-5, 7e-5 at steps 1–3; without those 104 numbers
    (11 tensors, found by `_ignored`), 4e-8, 7e-8, 1e-6. The same amplification hits the odd
    weight whose gradient happens to be ~ε (5 of the 1.8 M that move in stage 2, up to 0.09·lr
    apart), which sets the UNet's 3e-6; and each difference perturbs the next step's gradients,
    so the error grows with the steps. That is why the one-process run uses one thread, as each
    of torchrun's does: one process on two threads differs from one thread by 2e-6, 5e-6, 1.4e-5
    (VAE, steps 1–3), more than two processes do. It is also why the weights are compared and not
    their change θ_k − θ₀ (which the shared θ₀ does not flatter): those few weights dominate a
    change of ~lr per weight, 3e-4 for the UNet. Real mistakes are far above the tolerance: a
    process training on another process's rows gives 9e-3 at step 1, a process whose gradients
    are not averaged differs from the other, summed gradients give twice the gradient norm.

    ~20 s on 2 CPU cores. The same command, with --device=cuda and one GPU per process, runs with
    nccl (init_distributed picks it; not run here, which needs two GPUs), and on several machines
    with torchrun's --nnodes and --rdzv_* options (sdlearn/distributed.py).
    """
    one, two, two_unet = tmp_path / "one", tmp_path / "two", tmp_path / "two_unet"
    for folder in ("trace1", "trace2"):
        (tmp_path / folder).mkdir()
    _one_process("vae", one, tmp_path / "trace1", monkeypatch)
    two.mkdir()
    _torchrun("vae", two, tmp_path / "trace2")
    two_unet.mkdir()                  # stage 2 on both sides from the same stage 1: the one process's
    for name in ("config.json", "latents.pt", "vae.pt"):
        shutil.copy(one / name, two_unet / name)
    _one_process("unet", one, tmp_path / "trace1", monkeypatch)
    _torchrun("unet", two_unet, tmp_path / "trace2")

    config = ModelConfig.from_dict(json.loads((one / "config.json").read_text()))
    torch.manual_seed(0)
    ignored = {"vae": _ignored(train.Reconstruction(AutoencoderKL(config.vae)), torch.randn(1, 3, 16, 16).double(),
                               torch.randn(1, 4, 2, 2).double()),
               "unet": _ignored(train.TextToNoise(config), torch.randn(1, 4, 8, 8).double(), torch.tensor([500]),
                                torch.randint(49408, (1, 77)))}
    errors = {}
    for stage in ("vae", "unet"):
        for step in range(1, STEPS + 1):
            w1, r0, r1 = (_weights(tmp_path / trace, stage, step, rank)
                          for trace, rank in (("trace1", 0), ("trace2", 0), ("trace2", 1)))
            assert list(r0) == list(r1) == list(w1)
            assert [n for n in r0 if not torch.equal(r0[n], r1[n])] == [], f"{stage} step {step}: the ranks differ"
            for net in dict.fromkeys(n.split(".")[0] for n in w1):
                names = [n for n in w1 if n.startswith(net + ".") and n not in ignored[stage]]
                flat = lambda w: torch.cat([w[n].flatten().double() for n in names])
                error = ((flat(r0) - flat(w1)).norm() / flat(w1).norm()).item()
                errors[net] = max(errors.get(net, 0.0), error)
                assert error <= TOLERANCE, f"{stage} step {step}, {net}: ‖θ₂ − θ₁‖/‖θ₁‖ = {error:.1e}"
        few = sum(w1[n].numel() for n in ignored[stage])
        assert 0 < few < 0.005 * sum(v.numel() for v in w1.values()), sorted(ignored[stage])
    print("largest ‖θ₂ − θ₁‖/‖θ₁‖ over the steps:", {k: f"{v:.1e}" for k, v in errors.items()})

    for stage, out in (("vae", two), ("unet", two_unet)):
        log = lambda run, key: [r[key] for r in runlog.read_log(run) if r.get("stage") == stage and "loss" in r]
        assert len(log(one, "loss")) == STEPS
        assert log(out, "loss") == pytest.approx(log(one, "loss"), rel=TOLERANCE)
        assert log(out, "grad_norm") == pytest.approx(log(one, "grad_norm"), rel=TOLERANCE)
