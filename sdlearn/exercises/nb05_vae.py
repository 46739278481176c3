"""Notebook 05 (the VAE): GroupNorm written out, the reparameterised sample, the scaling factor."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..vae import DiagonalGaussian
from .core import Case, Exercise, Mistake, difference, register


# ------------------------------------------------------------------------------- group_norm

def _affine(x, num_groups):
    g = torch.Generator().manual_seed(x.shape[1] * 100 + num_groups)
    c = x.shape[1]
    return 1 + 0.5 * torch.randn(c, generator=g), 0.3 * torch.randn(c, generator=g)


def _group_norm_cases() -> list[Case]:
    g = torch.Generator().manual_seed(5)
    out = []
    for label, shape, groups, eps, spread in [
            ("x (2, 8, 4, 4), 4 groups, eps = 1e-6", (2, 8, 4, 4), 4, 1e-6, 1.0),
            ("x (1, 6, 2, 3), 3 groups, eps = 1e-6", (1, 6, 2, 3), 3, 1e-6, 1.0),
            ("x (2, 4, 3, 3) of small variance (about 1e-4), 2 groups, eps = 0.01", (2, 4, 3, 3), 2, 1e-2, 1e-2),
            ("x (1, 32, 5, 5), 32 groups (one channel each), eps = 1e-5", (1, 32, 5, 5), 32, 1e-5, 1.0)]:
        x = spread * torch.randn(shape, generator=g) + torch.randn(shape[:2] + (1, 1), generator=g)
        w, b = _affine(x, groups)
        out.append(Case(label, (x, groups, w, b, eps)))
    return out


def _normalise(x, groups, weight, bias, eps, over_channels, unbiased=False, eps_outside=False, affine=True):
    b, c = x.shape[:2]
    h = x.reshape(b, over_channels, -1)
    var = h.var(-1, unbiased=unbiased, keepdim=True)
    std = var.sqrt() + eps if eps_outside else (var + eps).sqrt()
    h = ((h - h.mean(-1, keepdim=True)) / std).reshape(x.shape)
    if not affine:
        return h
    shape = (1, c) + (1,) * (x.dim() - 2)
    return h * weight.reshape(shape) + bias.reshape(shape)


register(Exercise(
    name="group_norm", notebook="05_vae", capstone=True,
    reference=lambda x, num_groups, weight, bias, eps: F.group_norm(x, num_groups, weight, bias, eps),
    cases=_group_norm_cases,
    mistakes=[
        Mistake("you normalised each channel on its own (that is instance norm); GroupNorm takes the mean and "
                "variance over all the channels of a group together, and over H and W.",
                lambda x, n, w, b, e: _normalise(x, n, w, b, e, x.shape[1])),
        Mistake("you normalised over the whole sample, all channels at once (that is layer norm); split the "
                "channels into num_groups groups and normalise each group separately.",
                lambda x, n, w, b, e: _normalise(x, n, w, b, e, 1)),
        Mistake("your variance divides by n − 1 (torch's default, unbiased); GroupNorm's divides by n.",
                lambda x, n, w, b, e: _normalise(x, n, w, b, e, n, unbiased=True)),
        Mistake("eps belongs inside the square root, √(var + eps); you added it to the standard deviation.",
                lambda x, n, w, b, e: _normalise(x, n, w, b, e, n, eps_outside=True)),
        Mistake("the normalised values are right but the affine step is missing: multiply by weight and add "
                "bias, one value per channel (not per group).",
                lambda x, n, w, b, e: _normalise(x, n, w, b, e, n, affine=False))],
    hint="take one sample and one group at a time: which values share a mean and a variance (section 7), does "
         "your variance divide by n or n − 1, and is the scale applied per group or per channel?",
    atol=1e-4, rtol=1e-4))


# ---------------------------------------------------------------------------- sample_latent

def _sample_cases() -> list[Case]:
    g = torch.Generator().manual_seed(6)
    out = []
    for label, shape, centre in [("mean, logvar, noise (2, 4, 8, 8), log σ² around −4", (2, 4, 8, 8), -4.0),
                                 ("mean, logvar, noise (1, 4, 3, 5), log σ² around +1", (1, 4, 3, 5), 1.0)]:
        mean = torch.randn(shape, generator=g)
        logvar = centre + torch.randn(shape, generator=g)
        out.append(Case(label, (mean, logvar, torch.randn(shape, generator=g))))
    return out


def _sample_reference(mean, logvar, noise):
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))     # the package's own σ = exp(½ log σ²)
    return posterior.mean + posterior.std * noise


register(Exercise(
    name="sample_latent", notebook="05_vae",
    reference=_sample_reference,
    cases=_sample_cases,
    mistakes=[
        Mistake("you multiplied the noise by exp(logvar), which is the variance σ²; "
                "the sample needs the standard deviation σ, its square root.",
                lambda m, lv, n: m + torch.exp(lv) * n),
        Mistake("logvar is the logarithm of the variance, not the standard deviation: turn it into σ before "
                "multiplying the noise.",
                lambda m, lv, n: m + lv * n),
        Mistake("you returned the mean (the mode); a sample adds the noise, scaled by σ.",
                lambda m, lv, n: m.clone())],
    hint="section 5's reparameterisation: which quantity scales the "
         "noise, and how do you get it from a log-variance?",
    atol=1e-5, rtol=1e-4))


# --------------------------------------------------------------------------- scaling_factor

def _scaling_cases() -> list[Case]:
    g = torch.Generator().manual_seed(7)
    per_channel_mean = torch.tensor([0.8, -0.3, 0.1, 0.5])[None, :, None, None]
    per_channel_std = torch.tensor([1.5, 0.7, 1.0, 2.2])[None, :, None, None]
    return [Case("latents (16, 4, 8, 8), channels of different mean and spread",
                 (per_channel_mean + per_channel_std * torch.randn(16, 4, 8, 8, generator=g),)),
            Case("latents (4, 4, 6, 6) of std about 5.5 (like SD's, where s = 0.18215)",
                 (1.0 + 5.5 * torch.randn(4, 4, 6, 6, generator=g),))]


def _scaling_reference(latents):
    # what sdlearn.train.measure_vae stores in the tiny model's config: 1 / std over every element
    return 1.0 / latents.std().item()


def _one_number(got, expected) -> str | None:
    """The factor is one number (a float or a one-element tensor); several numbers are named as such."""
    if isinstance(expected, torch.Tensor):          # comparing with a planted mistake's answer
        return difference(got, expected, 1e-6, 1e-4)
    if isinstance(got, torch.Tensor) and got.numel() != 1:
        return f"the answer is a tensor of shape {tuple(got.shape)}; expected one number (a float)"
    if isinstance(got, torch.Tensor):
        got = got.item()
    return difference(got, expected, 1e-6, 1e-4)


register(Exercise(
    name="scaling_factor", notebook="05_vae",
    reference=_scaling_reference,
    cases=_scaling_cases,
    mistakes=[
        Mistake("you measured one std per channel; SD uses one number for all four channels: the std over "
                "every element of the batch.",
                lambda z: 1.0 / z.std(dim=(0, 2, 3))),
        Mistake("you divided by the variance; z · s must have standard deviation "
                "1, and the variance is the standard deviation squared.",
                lambda z: 1.0 / z.var().item()),
        Mistake("you returned the standard deviation itself; multiplying the latents "
                "by it would spread them more, not bring their spread to 1.",
                lambda z: z.std().item()),
        Mistake("you divided by the root mean square √mean(z²); the std subtracts the mean first, and these "
                "latents do not have mean 0.",
                lambda z: 1.0 / z.pow(2).mean().sqrt().item())],
    hint="one number for the whole batch: by what must you multiply the latents so "
         "that the standard deviation over all their elements becomes 1?",
    atol=1e-6, rtol=1e-4, compare=_one_number))
