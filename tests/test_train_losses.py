"""The training objectives on fixed batches, each checked against a computation written out here by
hand (plain Python loops over small explicit tensors): the VAE loss, the noise-prediction loss,
caption dropout and the EMA of the weights."""
import math

import pytest
import torch
import torch.nn as nn

from sdlearn import train
from sdlearn.schedule import NoiseSchedule
from sdlearn.vae import DiagonalGaussian

# one picture per row, 1 channel, 2 × 3 pixels
X = [[[[0.0, 0.5, -1.0], [1.0, 0.25, 0.0]]], [[[-0.5, 0.0, 0.5], [0.75, -0.25, 1.0]]]]
X_HAT = [[[[0.5, 0.5, -0.5], [0.0, 1.0, 0.0]]], [[[0.0, 0.25, 0.0], [0.5, 0.5, 0.0]]]]
# the posterior: μ and log σ² of a 1 × 1 × 2 latent per picture
MU = [[[[0.5, -1.0]]], [[[0.0, 2.0]]]]
LOGVAR = [[[[0.0, math.log(0.25)]]], [[[math.log(4.0), -1.0]]]]


def _pixels(t):
    """(b, c, i, j, value) for every element of a nested list (B, C, H, W)."""
    return [(b, c, i, j, v) for b, pb in enumerate(t) for c, pc in enumerate(pb)
            for i, row in enumerate(pc) for j, v in enumerate(row)]


def test_vae_loss_is_l1_plus_weighted_l2_edges_and_kl_per_latent_dimension():
    s = train.Settings(l2_weight=2.0, edge_weight=3.0, kl_weight=5.0)      # all different, none 1
    diffs = [v - X[b][c][i][j] for b, c, i, j, v in _pixels(X_HAT)]
    l1 = sum(abs(d) for d in diffs) / len(diffs)
    l2 = sum(d * d for d in diffs) / len(diffs)
    # edges: differences between vertical neighbours, then horizontal ones, a mean of |∇x̂ − ∇x| each
    vertical = [(X_HAT[b][c][i + 1][j] - X_HAT[b][c][i][j]) - (X[b][c][i + 1][j] - X[b][c][i][j])
                for b, c, i, j, _ in _pixels(X) if i + 1 < 2]
    horizontal = [(X_HAT[b][c][i][j + 1] - X_HAT[b][c][i][j]) - (X[b][c][i][j + 1] - X[b][c][i][j])
                  for b, c, i, j, _ in _pixels(X) if j + 1 < 3]
    assert (len(vertical), len(horizontal)) == (6, 8)
    edge = sum(abs(d) for d in vertical) / 6 + sum(abs(d) for d in horizontal) / 8
    # KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − 1 − log σ²) summed over each picture's latent, then
    # averaged over the pictures and divided by the latent's size (2)
    kl_per_picture = [0.0, 0.0]
    for b, c, i, j, mu in _pixels(MU):
        logvar = LOGVAR[b][c][i][j]
        kl_per_picture[b] += 0.5 * (mu ** 2 + math.exp(logvar) - 1 - logvar)
    kl = sum(kl_per_picture) / 2 / 2
    expected = l1 + 2.0 * l2 + 3.0 * edge + 5.0 * kl

    posterior = DiagonalGaussian(torch.cat([torch.tensor(MU), torch.tensor(LOGVAR)], dim=1))
    loss, parts = train.vae_loss(torch.tensor(X_HAT), torch.tensor(X), posterior.kl(), 2, s)
    assert parts == pytest.approx({"l1": l1, "l2": l2, "edge": edge, "kl": kl}, rel=1e-6)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_vae_loss_peak_and_preview_terms():
    """The peak term: per picture, the mean of the PEAK_PIXELS largest pixel errors (|x − x̂| summed
    over channels), averaged over pictures; the preview term: the squared error between the
    preview head's colours and each latent pixel's patch mean."""
    g = torch.Generator().manual_seed(0)
    x, x_hat = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    x_hat[0, :, 5, 6] += 4.0                                    # one speck in the first picture
    preview = torch.rand(2, 3, 2, 2, generator=g)
    s = train.Settings(peak_weight=0.5, preview_weight=2.0)
    loss, parts = train.vae_loss(x_hat, x, torch.zeros(2), 4, s, preview)
    peaks = []
    for b in range(2):
        errors = sorted((sum(abs(x_hat[b, c, i, j].item() - x[b, c, i, j].item()) for c in range(3))
                         for i in range(8) for j in range(8)), reverse=True)
        peaks.append(sum(errors[:train.PEAK_PIXELS]) / train.PEAK_PIXELS)
    patch_errors = [(preview[b, c, i, j].item() - x[b, c, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean().item()) ** 2
                    for b in range(2) for c in range(3) for i in range(2) for j in range(2)]
    assert parts["peak"] == pytest.approx(sum(peaks) / 2, rel=1e-5)
    assert parts["preview"] == pytest.approx(sum(patch_errors) / len(patch_errors), rel=1e-5)
    rest = parts["l1"] + parts["l2"] + 0.5 * parts["edge"]      # default λ₂ = 1, λ_edge = 0.5, KL 0 here
    assert loss.item() == pytest.approx(rest + 0.5 * parts["peak"] + 2.0 * parts["preview"], rel=1e-5)
    assert "peak" not in train.vae_loss(x_hat, x, torch.zeros(2), 4, train.Settings())[1]   # off by default


def test_noise_prediction_loss_is_the_mse_between_the_noise_and_its_prediction_from_the_noised_latent():
    z0 = [[[[1.0, -2.0]]], [[[0.5, 3.0]]]]                     # (2, 1, 1, 2)
    noise = [[[[0.3, -0.7]]], [[[1.5, 0.0]]]]
    t = [0, 999]
    cond = [0.25, -1.0]                                        # what the model takes as c: one number per row
    # ᾱ_t = Π_{i ≤ t} (1 − β_i), with SD's β_i = (√0.00085 + (√0.012 − √0.00085) · i / 999)²
    betas = [(math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / 999) ** 2 for i in range(1000)]
    alphas_cumprod = [math.prod(1 - beta for beta in betas[:k + 1]) for k in t]
    model = lambda z_t, t, c: 0.5 * z_t + 0.001 * t.view(-1, 1, 1, 1) + c.view(-1, 1, 1, 1)   # a stand-in ε_θ

    squares = []
    for b, c, i, j, x0 in _pixels(z0):
        eps, abar = noise[b][c][i][j], alphas_cumprod[b]
        z_t = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
        eps_hat = 0.5 * z_t + 0.001 * t[b] + cond[b]
        squares.append((eps - eps_hat) ** 2)
    expected = sum(squares) / len(squares)

    loss = train.noise_prediction_loss(model, torch.tensor(z0), torch.tensor(t), torch.tensor(noise),
                                       torch.tensor(cond), NoiseSchedule.scaled_linear())
    assert loss.item() == pytest.approx(expected, rel=1e-5)


EMPTY = torch.tensor([[49406, 49407, 49407]])                  # CLIP(""): start, end, padding
CAPTIONS = torch.tensor([[49406, 736, 49407], [49406, 2866, 49407], [49406, 1746, 49407],
                         [49406, 5046, 49407], [49406, 7212, 49407], [49406, 4990, 49407]])


def test_caption_dropout_empties_the_rows_whose_uniform_falls_below_p():
    # torch.manual_seed(0)'s first uniforms: 0.4963, 0.7682, 0.0885, 0.1320, 0.3074, 0.6341 | 0.4901
    out = train.caption_dropout(CAPTIONS, EMPTY, 0.3, torch.Generator().manual_seed(0))
    dropped = [i for i in range(6) if out[i].tolist() == EMPTY[0].tolist()]
    assert dropped == [2, 3]                                   # 0.0885 and 0.1320 < 0.3; 0.3074 is not
    kept = [i for i in range(6) if i not in dropped]
    assert out[kept].tolist() == CAPTIONS[kept].tolist()


def test_caption_dropout_draws_one_uniform_per_row_so_the_later_draws_stay_put():
    g = torch.Generator().manual_seed(0)
    train.caption_dropout(CAPTIONS, EMPTY, 0.3, g)
    assert torch.rand(1, generator=g).item() == pytest.approx(0.4901, abs=1e-4)   # the 7th uniform


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_caption_dropout_empties_a_share_p_of_the_captions(p):
    n = 20_000
    ids = CAPTIONS[torch.arange(n) % 6]
    out = train.caption_dropout(ids, EMPTY, p, torch.Generator().manual_seed(1))
    share = (out == EMPTY).all(dim=1).float().mean().item()
    assert abs(share - p) <= 4 * math.sqrt(p * (1 - p) / n)   # within 4 standard deviations (exact at 0 and 1)


def test_ema_follows_the_weights_with_the_warm_up_decay():
    """θ_ema ← d·θ_ema + (1 − d)·θ with d = min(decay, (1 + k) / (10 + k)) at step k."""
    net = nn.Linear(2, 1)
    theta = [[1.0, -2.0, 0.5], [3.0, 0.0, -1.5], [-1.0, 4.0, 2.0]]   # (weight₁, weight₂, bias) at three times

    def set_weights(values):
        with torch.no_grad():
            net.weight.copy_(torch.tensor([values[:2]]))
            net.bias.copy_(torch.tensor([values[2]]))

    set_weights(theta[0])
    ema = train.EMA(net, decay=0.5)
    expected = list(theta[0])                                  # starts at the weights
    for k, values in ((0, theta[1]), (20, theta[2])):          # d = min(0.5, 1/10) = 0.1, then min(0.5, 21/30) = 0.5
        set_weights(values)
        ema.update(net, k)
        d = min(0.5, (1 + k) / (10 + k))
        expected = [d * e + (1 - d) * v for e, v in zip(expected, values)]
    # by hand: 0.1·θ₀ + 0.9·θ₁ = (2.8, −0.2, −1.3); then ½ of that + ½·θ₂ = (0.9, 1.9, 0.35)
    assert expected == pytest.approx([0.9, 1.9, 0.35])
    assert ema.weights["weight"].flatten().tolist() + ema.weights["bias"].tolist() == pytest.approx(expected, rel=1e-6)
    copy = ema.copy_to(nn.Linear(2, 1))
    assert copy.weight.flatten().tolist() + copy.bias.tolist() == pytest.approx(expected, rel=1e-6)


def test_ema_decay_is_capped_by_decay_after_the_warm_up():
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = train.EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net, 1000)                                      # (1 + 1000) / (10 + 1000) = 0.991 > 0.9
    assert ema.weights["weight"].item() == pytest.approx(0.1)
