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


def test_bayes_splits_the_conditional_score_into_unconditional_plus_classifier():
    """∇ log p_t(x | c) = ∇ log p_t(x) + ∇ log p_t(c | x), the identity classifier-free guidance rests on."""
    mix = GaussianMixture.ring(classes=2)
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.5
    mix64 = GaussianMixture(mix.means.double(), mix.stds.double(), mix.weights.double(), mix.labels)
    for alpha_bar in (0.9, 0.3, 0.02):
        xg = x.clone().requires_grad_(True)
        log_classifier = mix64.class_probs(xg, alpha_bar)[:, 1].log().sum()
        (grad_classifier,) = torch.autograd.grad(log_classifier, xg)
        left = mix64.given(1).score(x, alpha_bar)
        torch.testing.assert_close(left, mix64.score(x, alpha_bar) + grad_classifier)


def test_guidance_1_is_the_class_and_more_pushes_away_from_the_others():
    from sdlearn.toy import IdealDenoiser
    mix = GaussianMixture.ring(classes=2)
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(IdealDenoiser(mix, label=0, guidance=1.0)(x, 500), IdealDenoiser(mix.given(0))(x, 500))
    torch.testing.assert_close(IdealDenoiser(mix, label=0, guidance=0.0)(x, 500), IdealDenoiser(mix)(x, 500))

    def draw(guidance):
        sampler = get_sampler("ddim")
        sampler.set_timesteps(50)
        noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
        return sample_loop(sampler, IdealDenoiser(mix, label=0, guidance=guidance), noise, sampler.timesteps).x

    exact, strong = draw(1.0), draw(5.0)
    assert (mix.class_probs(exact)[:, 0] > 0.5).float().mean() > 0.97      # g = 1: class 0's blobs
    nearest = torch.cdist(exact, mix.means).argmin(1)
    assert set(nearest.unique().tolist()) == {0, 2, 4}                      # all of them, not one
    radius = lambda x: x.norm(dim=1).mean()
    assert radius(strong) > radius(exact) + 0.1                              # g = 5: pushed past the blobs
    with pytest.raises(ValueError, match="no class labels"):
        GaussianMixture.ring().given(0)
