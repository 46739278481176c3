"""Notebook 05's exercises against the package: a learner's GroupNorm is nn.GroupNorm inside the VAE
(through the capstone's use()), the reparameterised sample is DiagonalGaussian.sample with the same
noise, and the scaling factor brings a batch of latents to unit variance."""
from __future__ import annotations

import torch

from sdlearn import exercises
from sdlearn.configs import VAEConfig
from sdlearn.vae import AutoencoderKL, DiagonalGaussian


def learner_group_norm(x, num_groups, weight, bias, eps):
    b, c = x.shape[:2]
    g = x.reshape(b, num_groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(((g - g.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True) + eps)
    shape = (1, c) + (1,) * (x.dim() - 2)
    return g.reshape(x.shape) * weight.reshape(shape) + bias.reshape(shape)


def test_a_learners_group_norm_passes_and_decodes_like_the_package():
    assert exercises.run_check("group_norm", learner_group_norm).passed
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8,
                                  sample_size=32)).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        reference = vae.decode(vae.encode(x).mean)
        with exercises.use({"group_norm": learner_group_norm}):
            mine = vae.decode(vae.encode(x).mean)
    assert torch.allclose(mine, reference, atol=1e-4), (mine - reference).abs().max()


def test_sample_latent_is_diagonal_gaussian_sample_with_the_same_noise():
    g = torch.Generator().manual_seed(1)
    moments = torch.randn(2, 8, 4, 4, generator=g)
    posterior = DiagonalGaussian(moments)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    sample = posterior.sample(torch.Generator().manual_seed(2))
    by_exercise = exercises.EXERCISES["sample_latent"].reference(posterior.mean, posterior.logvar, noise)
    assert torch.allclose(by_exercise, sample, atol=1e-6)


def test_the_scaling_factor_gives_unit_variance():
    z = 0.3 + 2.5 * torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    s = exercises.EXERCISES["scaling_factor"].reference(z)
    assert isinstance(s, float) and abs((z * s).std().item() - 1) < 1e-5
    assert exercises.run_check("scaling_factor", lambda latents: 1 / latents.flatten().std()).passed
