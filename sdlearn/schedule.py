"""The forward (noising) process of a diffusion model and the noise schedules SD cares about.

Ho et al. 2020 (DDPM), eq. (2) and (4):

    q(x_t | x_{t-1}) = N(√(1−β_t) x_{t-1}, β_t I)
    α_t = 1 − β_t,    ᾱ_t = ∏_{s≤t} α_s
    q(x_t | x_0)     = N(√ᾱ_t x_0, (1−ᾱ_t) I)      ⇒   x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε,  ε ~ N(0, I)

and the posterior of one step back, eq. (7):

    q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I),    β̃_t = (1−ᾱ_{t−1}) / (1−ᾱ_t) · β_t

Three ways to choose β_1 … β_T (T = 1000):

    linear         β_t = linspace(1e-4, 0.02)                           DDPM
    scaled_linear  β_t = linspace(√0.00085, √0.012)²                    Stable Diffusion v1 (CompVis calls it "linear")
    cosine         ᾱ(t) = cos²(((t/T) + s)/(1 + s) · π/2),  s = 0.008,
                   β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999)                    Nichol & Dhariwal 2021

Index i of every tensor here is timestep i, 0-based: `alphas_cumprod[0]` is ᾱ after one step of
noise (the paper's ᾱ_1), `alphas_cumprod[999]` the last. The σ-based samplers (Euler, DPM-Solver)
see the same process as x_t/√ᾱ_t = x_0 + σ_t ε with σ_t = √((1−ᾱ_t)/ᾱ_t).

Everything is float32 and computed the way diffusers computes it (float32 `linspace`, float32
`cumprod`), so `alphas_cumprod` equals diffusers' bit for bit. The CompVis code computes in
float64 and rounds at the end; the two differ by a few float32 ulps (see notebook 03).
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "scaled_linear", "cosine")


class NoiseSchedule:
    """β_t and everything derived from it, for t = 0 … T−1 (1-D float32 tensors of length T).

    Build one with `NoiseSchedule.scaled_linear()` (SD v1), `.linear()` (DDPM) or `.cosine()`,
    or from any betas: `NoiseSchedule(betas, name="mine")`.
    """

    def __init__(self, betas: torch.Tensor, name: str = "custom", alphas_cumprod: torch.Tensor | None = None):
        betas = torch.as_tensor(betas)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError(f"betas must be a 1-D tensor with every value in (0, 1); got shape "
                             f"{tuple(betas.shape)}, range [{betas.min().item()}, {betas.max().item()}]")
        self.name = name
        self.betas = betas.to(torch.float32)
        self.alphas = 1.0 - self.betas
        # ᾱ_t = ∏_{s≤t} α_s; given from outside only by the classroom capstone (your own ᾱ)
        self.alphas_cumprod = (torch.cumprod(self.alphas, dim=0) if alphas_cumprod is None
                               else torch.as_tensor(alphas_cumprod, dtype=torch.float32))
        if self.alphas_cumprod.shape != self.betas.shape:
            raise ValueError(f"alphas_cumprod has shape {tuple(self.alphas_cumprod.shape)}; expected "
                             f"{tuple(self.betas.shape)}, one ᾱ_t per β_t")
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # ᾱ_{t−1} with ᾱ_{−1} = 1 (no noise before the first step), so β̃_0 = 0.
        alphas_cumprod_prev = torch.cat([torch.ones(1), self.alphas_cumprod[:-1]])
        self.posterior_variance = (1.0 - alphas_cumprod_prev) / (1.0 - self.alphas_cumprod) * self.betas
        self.sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    # ---- the three schedules -------------------------------------------------------------

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> "NoiseSchedule":
        """DDPM (Ho et al. 2020): β_t evenly spaced from 1e-4 to 0.02."""
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        return cls(betas, name="linear")

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> "NoiseSchedule":
        """Stable Diffusion v1: √β_t evenly spaced, β_t = linspace(√0.00085, √0.012)²."""
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                               dtype=torch.float32) ** 2
        return cls(betas, name="scaled_linear")

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, s: float = 0.008,
               max_beta: float = 0.999) -> "NoiseSchedule":
        """Nichol & Dhariwal 2021: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999).

        Computed in float64 with Python's `math.cos`, value by value, then rounded to float32, as
        diffusers' "squaredcos_cap_v2" does. (`torch.cos` would do: but the last bit of a
        vectorised cosine depends on the maths library the CPU gets, and that bit can survive
        the rounding to float32; `math.cos` is the C library's, the same call diffusers makes.)
        """
        alpha_bar = torch.tensor([math.cos((i / num_train_timesteps + s) / (1 + s) * math.pi / 2) ** 2
                                  for i in range(num_train_timesteps + 1)], dtype=torch.float64)
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
        return cls(betas.to(torch.float32), name="cosine")

    @classmethod
    def from_name(cls, name: str, num_train_timesteps: int = 1000) -> "NoiseSchedule":
        if name not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {name!r}; expected one of {SCHEDULES}")
        return getattr(cls, name)(num_train_timesteps)

    # ---- signal and noise ----------------------------------------------------------------

    def snr(self, t: int | torch.Tensor | None = None) -> torch.Tensor:
        """Signal-to-noise ratio SNR(t) = ᾱ_t / (1 − ᾱ_t); all T values when t is None."""
        snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        return snr if t is None else snr[torch.as_tensor(t)]

    def log_snr(self, t: int | torch.Tensor | None = None) -> torch.Tensor:
        """log SNR(t) = log ᾱ_t − log(1 − ᾱ_t) = −2 log σ_t (DPM-Solver's 2λ_t)."""
        return self.snr(t).log()

    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε.   x0, noise (B, …); t an int or a (B,) tensor → (B, …)."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}; "
                             "they must match")
        t = torch.as_tensor(t, device="cpu").long()
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, x0.shape[0])):
            raise ValueError(f"t must be an int or a 1-D tensor with one timestep per batch element "
                             f"({x0.shape[0]}); got shape {tuple(t.shape)}")
        if ((t < 0) | (t >= self.num_train_timesteps)).any():
            raise ValueError(f"timesteps must lie in 0 … {self.num_train_timesteps - 1}; got {t.tolist()}")
        shape = (-1,) + (1,) * (x0.ndim - 1)
        a = self.sqrt_alphas_cumprod[t].reshape(shape).to(x0.device, x0.dtype)
        b = self.sqrt_one_minus_alphas_cumprod[t].reshape(shape).to(x0.device, x0.dtype)
        return a * x0 + b * noise

    def __repr__(self) -> str:
        return (f"NoiseSchedule.{self.name}(T={self.num_train_timesteps}, "
                f"β {self.betas[0].item():.5f}…{self.betas[-1].item():.5f}, "
                f"ᾱ_T={self.alphas_cumprod[-1].item():.5f})")
