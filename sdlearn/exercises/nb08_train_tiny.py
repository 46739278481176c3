"""Notebook 08 (training the tiny model): the latents a training step starts from, one ε-prediction
training step with caption dropout, and the EMA update."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import train
from ..schedule import NoiseSchedule
from .core import Case, Exercise, Mistake, difference, register


# -------------------------------------------------------------------------- training_latents

def _latent_cases() -> list[Case]:
    g = torch.Generator().manual_seed(8)
    out = []
    for label, shape, s in [("mean, std, noise (4, 4, 8, 8), scaling_factor = 0.76", (4, 4, 8, 8), 0.76),
                            ("mean, std, noise (2, 4, 3, 3), scaling_factor = 0.18215", (2, 4, 3, 3), 0.18215)]:
        mean = 1.5 * torch.randn(shape, generator=g)
        std = 0.05 + 0.2 * torch.rand(shape, generator=g)
        out.append(Case(label, (mean, std, torch.randn(shape, generator=g), s)))
    return out


def _latent_reference(mean, std, noise, scaling_factor):
    # sdlearn.train.train_unet's loss_fn: z0 = scale * (mean[idx] + std[idx] * eps_z)
    return scaling_factor * (mean + std * noise)


register(Exercise(
    name="training_latents", notebook="08_train_tiny",
    reference=_latent_reference,
    cases=_latent_cases,
    mistakes=[
        Mistake("you divided by the scaling factor; that is the way back, before decoding. The UNet is "
                "trained on latents multiplied by it (unit variance).",
                lambda m, s, n, f: (m + s * n) / f),
        Mistake("the scaling factor is missing: the UNet learns on latents brought to "
                "unit variance (notebook 05), not on the VAE's own scale.",
                lambda m, s, n, f: m + s * n),
        Mistake("you scaled only the mean; the scaling factor applies to the whole sample, noise included.",
                lambda m, s, n, f: f * m + s * n)],
    hint="draw one sample of the VAE's posterior (as in notebook 05), then bring it to the UNet's scale.",
    atol=1e-5, rtol=1e-4))


# ----------------------------------------------------------------------------- training_loss

class ToyNoiseModel(nn.Module):
    """A stand-in for ε_θ(z_t, t, ids), cheap and deterministic: it reads every input, the caption
    row by row, so a check can tell which caption, timestep and latents it was given."""

    def __init__(self, channels: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mix = nn.Parameter(torch.randn(channels, channels, generator=g) / channels ** 0.5)
        self.words = nn.Parameter(torch.randn(49408, channels, generator=g))

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        text = self.words[ids].mean(dim=1)                                   # (B, C)
        time = torch.as_tensor(t, dtype=z_t.dtype).reshape(-1, 1) / 1000
        return torch.einsum("dc,bchw->bdhw", self.mix, z_t) + (text * (1 + time))[:, :, None, None]


def _loss_cases() -> list[Case]:
    g = torch.Generator().manual_seed(9)
    abar = NoiseSchedule.scaled_linear().alphas_cumprod
    empty = torch.tensor([[49406] + [49407] * 76])                       # the tokenizer's ""
    out = []
    for label, b, t, drop in [
            ("a batch of 4, t = [10, 300, 650, 999], the 2nd caption dropped", 4, [10, 300, 650, 999],
             [False, True, False, False]),
            ("a batch of 3, t = [500, 500, 500], no caption dropped", 3, [500, 500, 500], [False, False, False]),
            ("a batch of 2, t = [0, 100], every caption dropped", 2, [0, 100], [True, True])]:
        latents = torch.randn(b, 4, 8, 8, generator=g)
        ids = torch.randint(0, 49406, (b, 77), generator=g)
        noise = torch.randn(b, 4, 8, 8, generator=g)
        out.append(Case(label, (ToyNoiseModel(seed=b), latents, ids, empty, torch.tensor(t), noise,
                                torch.tensor(drop), abar)))
    return out


def _loss_reference(model, latents, ids, empty_ids, t, noise, drop, alphas_cumprod):
    cond = torch.where(drop[:, None], empty_ids, ids)          # sdlearn.train.caption_dropout, given the mask
    schedule = NoiseSchedule(NoiseSchedule.scaled_linear(len(alphas_cumprod)).betas, alphas_cumprod=alphas_cumprod)
    return train.noise_prediction_loss(model, latents, t, noise, cond, schedule)


def _wrong_loss(model, latents, ids, empty_ids, t, noise, drop, abar, *, target="noise", invert=False, sqrt=True):
    cond = torch.where((~drop if invert else drop)[:, None], empty_ids, ids)
    a = abar[t].reshape(-1, 1, 1, 1)
    z_t = (a.sqrt() * latents + (1 - a).sqrt() * noise) if sqrt else (a * latents + (1 - a) * noise)
    predicted = model(z_t, t, cond)
    return F.mse_loss(predicted, {"noise": noise, "x0": latents, "x_t": z_t}[target])


def _compare_loss(got, expected) -> str | None:
    """A loss is one number: said as "the loss is 2.67; expected 2.82", not as element []."""
    if isinstance(got, torch.Tensor) and got.numel() == 1 and expected.numel() == 1:
        d = difference(got.item(), expected.item(), 1e-5, 1e-4)
        return d and d.replace("the answer", "the loss")
    if isinstance(got, torch.Tensor) and got.numel() != 1:
        return f"the loss is a tensor of shape {tuple(got.shape)}; expected one number (a mean over every element)"
    return difference(got, expected, 1e-5, 1e-4)


register(Exercise(
    name="training_loss", notebook="08_train_tiny",
    reference=_loss_reference,
    cases=_loss_cases,
    mistakes=[
        Mistake("you compared the prediction with the clean latents z₀; SD's UNet predicts the noise ε, so the "
                "loss is the mean squared error between its output and `noise`.",
                lambda *a: _wrong_loss(*a, target="x0")),
        Mistake("you compared the prediction with the noisy latents z_t; the target is the noise ε that was "
                "mixed in.",
                lambda *a: _wrong_loss(*a, target="x_t")),
        Mistake("the caption dropout is inverted: where `drop` is True the caption becomes the empty one, "
                "elsewhere it stays.",
                lambda *a: _wrong_loss(*a, invert=True)),
        Mistake("the noising weights are square roots (q_sample, notebook 03), so that the variance stays 1.",
                lambda *a: _wrong_loss(*a, sqrt=False))],
    hint="three steps, each from the text above: which caption does each row get, how are the latents "
         "noised to step t (q_sample, notebook 03), and what is the model's output compared with?",
    atol=1e-5, rtol=1e-4, compare=_compare_loss))


# -------------------------------------------------------------------------------- ema_update

class _Weights:
    """What sdlearn.train.EMA.update reads from a module: its state_dict."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.weights = weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.weights


def _ema_reference(ema_weights, weights, decay, step):
    ema = train.EMA(_Weights(ema_weights), decay)       # starts from a copy of ema_weights
    ema.update(_Weights(weights), step)
    return ema.weights


def _ema_cases() -> list[Case]:
    g = torch.Generator().manual_seed(10)

    def pair():
        keys = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "norm.weight": (4,)}
        return ({k: torch.randn(s, generator=g) for k, s in keys.items()},
                {k: torch.randn(s, generator=g) for k, s in keys.items()})
    return [Case(f"step = {k}, decay = {d}", (*pair(), d, k))
            for k, d in [(0, 0.999), (20, 0.999), (100_000, 0.999), (5, 0.5)]]


def _wrong_ema(ema_weights, weights, decay, step, *, swapped=False, warmup=True):
    d = min(decay, (1 + step) / (10 + step)) if warmup else decay
    if swapped:
        return {k: d * weights[k] + (1 - d) * ema_weights[k] for k in ema_weights}
    return {k: d * ema_weights[k] + (1 - d) * weights[k] for k in ema_weights}


register(Exercise(
    name="ema_update", notebook="08_train_tiny",
    reference=_ema_reference,
    cases=_ema_cases,
    mistakes=[
        Mistake("the two weights are swapped: which of the two should keep the large share d?",
                lambda e, w, d, k: _wrong_ema(e, w, d, k, swapped=True)),
        Mistake("the warm-up is missing: early in training d is smaller than `decay` (the formula above the "
                "exercise depends on the step), so the average forgets the random initial weights quickly.",
                lambda e, w, d, k: _wrong_ema(e, w, d, k, warmup=False)),
        Mistake("two things: the weights are swapped (which one keeps the "
                "share d?), and the warm-up of d is missing.",
                lambda e, w, d, k: _wrong_ema(e, w, d, k, swapped=True, warmup=False))],
    hint="compute d from decay and step first, then mix every tensor: most of the old average, a little of "
         "the new weights.",
    atol=1e-6, rtol=1e-5))
