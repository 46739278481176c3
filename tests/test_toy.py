"""The toy mixture's closed-form noise predictor is the true one."""
from __future__ import annotations

import pytest
import torch

from reference import rel_err
from sdlearn.samplers import get_sampler, sample_loop
from sdlearn.schedule import NoiseSchedule
from sdlearn.toy import GaussianMixture, IdealDenoiser, alpha_bar_at

MIX = GaussianMixture(means=torch.tensor([[1.5, 0.0], [-1.0, 1.0], [0.0, -2.0]]),
                      stds=torch.tensor([0.2, 0.4, 0.1]), weights=torch.tensor([0.5, 0.3, 0.2]))


def test_log_prob_is_the_mixture_density():
    x = torch.tensor([[0.3, -0.7]])
    dens = sum(w * torch.exp(-((x - m) ** 2).sum() / (2 * s ** 2)) / (2 * torch.pi * s ** 2)
               for m, s, w in zip(MIX.means, MIX.stds, MIX.weights))
    assert MIX.log_prob(x).item() == pytest.approx(dens.log().item(), rel=1e-5)


@pytest.mark.parametrize("alpha_bar", [0.999, 0.7, 0.2, 0.005])
def test_score_equals_autograd_of_log_density(alpha_bar):
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(MIX.log_prob(x, alpha_bar).sum(), x)
    assert rel_err(MIX.score(x.detach(), alpha_bar), grad) < 1e-10
    assert rel_err(MIX.eps(x.detach(), alpha_bar), -(1 - alpha_bar) ** 0.5 * grad) < 1e-10


def test_ideal_eps_is_the_least_squares_predictor():
    """E‖ε̂(x_t) − ε‖² is smallest for the closed form: scaling or shifting it does worse, and the
    residual is uncorrelated with x_t (E[ε | x_t] is a conditional mean)."""
    g = torch.Generator().manual_seed(1)
    x0 = MIX.sample(200_000, g).double()
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    abar = 0.4
    xt = abar ** 0.5 * x0 + (1 - abar) ** 0.5 * noise
    eps = MIX.eps(xt, abar)
    mse = ((eps - noise) ** 2).mean()
    assert mse < ((1.05 * eps - noise) ** 2).mean() and mse < ((0.95 * eps - noise) ** 2).mean()
    assert mse < ((eps + 0.05 - noise) ** 2).mean()
    assert ((noise - eps) * xt).mean(0).abs().max() < 0.01


def test_alpha_bar_at_integers_and_between():
    s = NoiseSchedule.scaled_linear()
    for t in (0, 1, 500, 999):
        assert alpha_bar_at(s, t).item() == pytest.approx(s.alphas_cumprod[t].item(), rel=1e-5)
    mid = alpha_bar_at(s, 500.5).item()
    assert s.alphas_cumprod[501].item() < mid < s.alphas_cumprod[500].item()


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_samplers_with_the_ideal_denoiser_recover_the_mixture(name):
    mix = GaussianMixture.ring()
    model = IdealDenoiser(mix)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    sampler = get_sampler(name)
    sampler.set_timesteps(50)
    x = sample_loop(sampler, model, noise * sampler.init_noise_sigma, sampler.timesteps).x
    nearest = torch.cdist(x, mix.means).min(dim=1)
    assert (nearest.values < 4 * mix.stds[0]).float().mean() > 0.97   # samples land on the blobs
    counts = torch.bincount(nearest.indices, minlength=len(mix.weights)) / len(x)
    assert (counts - mix.weights).abs().max() < 0.04                 # in the right proportions


def test_plot_trajectories_draws_paths_and_end_points():
    import matplotlib
    matplotlib.use("Agg")
    from sdlearn import viz
    mix = GaussianMixture.ring()
    paths = {"a": torch.randn(11, 50, 2), "b": torch.randn(6, 50, 2)}
    fig = viz.plot_trajectories(paths, density=mix, show=5)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["a", "b"]
    assert len(axes[0].lines) == 5 and len(axes[0].lines[0].get_xdata()) == 11
    assert axes[1].collections[-1].get_offsets().shape == (50, 2)
