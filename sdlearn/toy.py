"""A toy data distribution whose ideal noise predictor has a closed form, to watch samplers work.

Data: a mixture of isotropic Gaussians (in 2-D for the pictures, any dimension D works)

    p_0(x) = Σ_k π_k N(x; μ_k, s_k² I)

The forward process x_t = √ᾱ x_0 + √(1−ᾱ) ε keeps it a mixture of Gaussians:

    p_t(x) = Σ_k π_k N(x; √ᾱ μ_k, v_k I),        v_k = ᾱ s_k² + 1 − ᾱ

so its score is a responsibility-weighted pull towards each shrunken mean,

    ∇ log p_t(x) = −Σ_k r_k(x) (x − √ᾱ μ_k) / v_k,     r_k(x) = π_k N_k(x) / Σ_j π_j N_j(x)

and the best possible ε-predictor — the minimiser of E‖ε̂(x_t, t) − ε‖², i.e. E[ε | x_t] —
follows from Tweedie's formula (Song et al. 2021, "score-based generative modelling"):

    ε̂(x_t, t) = −√(1−ᾱ_t) ∇ log p_t(x_t)

A sampler driven by `IdealDenoiser` therefore shows the sampler's own error and nothing else:
no network, no training.

Classes make guidance exact too. Give each component a label c; the data of class c is the
sub-mixture of its components, p_0(x | c). By Bayes, p(x | c) = p(x) p(c | x) / p(c), so

    ∇ log p_t(x | c) = ∇ log p_t(x) + ∇ log p_t(c | x)

and classifier-free guidance with scale g follows the score

    ∇ log p_t(x) + g ∇ log p_t(c | x)   ⇔   ε̂ = ε_u + g (ε_c − ε_u)

g = 0: unconditional; g = 1: exactly the class; g > 1: the class's probability raised to the
power g — samples pushed away from the other classes, off the class's own blobs.
`IdealDenoiser(mixture, label=c, guidance=g)` computes that guided ε̂ in closed form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .schedule import NoiseSchedule


@dataclass(frozen=True)
class GaussianMixture:
    """Σ_k π_k N(μ_k, s_k² I): means (K, D), stds (K,), weights (K,) summing to 1; optional
    integer class labels (K,) of the components."""
    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor
    labels: torch.Tensor | None = None

    def __post_init__(self):
        k = self.means.shape[0]
        if self.means.ndim != 2 or self.stds.shape != (k,) or self.weights.shape != (k,):
            raise ValueError(f"expected means (K, D), stds (K,), weights (K,); got {tuple(self.means.shape)}, "
                             f"{tuple(self.stds.shape)}, {tuple(self.weights.shape)}")
        if abs(self.weights.sum().item() - 1) > 1e-5:
            raise ValueError(f"weights must sum to 1; they sum to {self.weights.sum().item()}")

    @classmethod
    def ring(cls, k: int = 6, radius: float = 1.6, std: float = 0.15, classes: int = 0) -> "GaussianMixture":
        """k equal blobs evenly spaced on a circle: a 2-D picture with clear modes. `classes` > 0
        labels them in turn 0, 1, …, classes − 1 around the circle."""
        angle = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
        means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
        labels = torch.arange(k) % classes if classes else None
        return cls(means.float(), torch.full((k,), std), torch.full((k,), 1.0 / k), labels)

    def given(self, label: int) -> "GaussianMixture":
        """p_0(x | c): the components of class `label`, their weights renormalised."""
        if self.labels is None:
            raise ValueError("this mixture has no class labels; build it with labels (e.g. ring(classes=2))")
        keep = self.labels == label
        if not keep.any():
            raise ValueError(f"no component has label {label}; labels are {sorted(set(self.labels.tolist()))}")
        w = self.weights[keep]
        return GaussianMixture(self.means[keep], self.stds[keep], w / w.sum(), self.labels[keep])

    def class_probs(self, x: torch.Tensor, alpha_bar: float | torch.Tensor = 1.0) -> torch.Tensor:
        """p_t(c | x) for points x (n, D) → (n, C): the responsibilities summed per class."""
        if self.labels is None:
            raise ValueError("this mixture has no class labels")
        log_joint, _, _ = self._components(x, alpha_bar)
        r = torch.softmax(log_joint, dim=1)
        return torch.zeros(len(x), int(self.labels.max()) + 1, dtype=x.dtype).index_add_(1, self.labels, r)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws from p_0 → (n, D)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator)
        return self.means[k] + self.stds[k, None] * z

    def _components(self, x: torch.Tensor, alpha_bar) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per component: log π_k + log N(x; √ᾱ μ_k, v_k I) (n, K), the offsets x − √ᾱ μ_k (n, K, D), v_k (K,)."""
        alpha_bar = torch.as_tensor(alpha_bar, dtype=x.dtype)
        var = alpha_bar * self.stds.to(x.dtype) ** 2 + (1 - alpha_bar)
        diff = x[:, None, :] - alpha_bar.sqrt() * self.means.to(x.dtype)
        log_n = -0.5 * (diff ** 2).sum(-1) / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return self.weights.to(x.dtype).log() + log_n, diff, var

    def log_prob(self, x: torch.Tensor, alpha_bar: float | torch.Tensor = 1.0) -> torch.Tensor:
        """log p_t(x) for points x (n, D) at noise level ᾱ (ᾱ = 1: the data itself) → (n,)."""
        log_joint, _, _ = self._components(x, alpha_bar)
        return torch.logsumexp(log_joint, dim=1)

    def score(self, x: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
        """∇ₓ log p_t(x) = −Σ_k r_k(x) (x − √ᾱ μ_k) / v_k → (n, D)."""
        log_joint, diff, var = self._components(x, alpha_bar)
        r = torch.softmax(log_joint, dim=1)                          # responsibilities (n, K)
        return -(r[:, :, None] * diff / var[:, None]).sum(1)

    def eps(self, x: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
        """The ideal noise prediction ε̂ = −√(1−ᾱ) ∇ log p_t(x) → (n, D)."""
        alpha_bar = torch.as_tensor(alpha_bar, dtype=x.dtype)
        return -(1 - alpha_bar).sqrt() * self.score(x, alpha_bar)


def alpha_bar_at(schedule: NoiseSchedule, t: int | float | torch.Tensor) -> torch.Tensor:
    """ᾱ at a timestep that may fall between integers (Karras-spaced samplers visit such t):
    log σ is interpolated linearly in t, the inverse of how the samplers turn σ into t."""
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, schedule.num_train_timesteps - 1)
    log_sigmas = schedule.sigmas.double().log()
    lo = t.floor().long().clamp(max=schedule.num_train_timesteps - 2)
    w = t - lo
    log_sigma = (1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]
    return (1 / (1 + (2 * log_sigma).exp())).float()


class IdealDenoiser:
    """The exact ε-predictor for a GaussianMixture, called like the UNet: `model(x_t, t)`.

    x_t (n, D) is the ordinary (variance-preserving) noisy sample, which is what every sampler
    hands the model after `scale_input`. With `label`, classifier-free guidance towards that class:
    ε̂ = ε_u + g (ε_c − ε_u), ε_u of the whole mixture and ε_c of the class's sub-mixture.
    """

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule | None = None, *,
                 label: int | None = None, guidance: float = 1.0):
        self.mixture = mixture
        self.schedule = schedule if schedule is not None else NoiseSchedule.scaled_linear()
        self.conditional = mixture.given(label) if label is not None else None
        self.guidance = guidance

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        alpha_bar = alpha_bar_at(self.schedule, t).to(x.dtype)
        eps_uncond = self.mixture.eps(x, alpha_bar)
        if self.conditional is None:
            return eps_uncond
        eps_cond = self.conditional.eps(x, alpha_bar)
        return eps_uncond + self.guidance * (eps_cond - eps_uncond)
