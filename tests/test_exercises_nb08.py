"""Notebook 08's exercises against the package: training_loss with the drop mask drawn the way
sdlearn.train.caption_dropout draws it is the training run's loss on a real (micro) text-to-noise
model; ema_update step after step is sdlearn.train.EMA; training_latents is train_unet's z₀."""
from __future__ import annotations

import torch

from sdlearn import exercises, train
from sdlearn.configs import ModelConfig
from sdlearn.schedule import NoiseSchedule
from sdlearn.tokenizer import default_tokenizer

EX = exercises.EXERCISES


def test_training_loss_is_the_training_runs_loss_on_a_micro_model():
    torch.manual_seed(0)
    model = train.TextToNoise(ModelConfig.micro()).eval()
    tok = default_tokenizer()
    ids, empty = tok(["a red circle", "a blue square on the left", "green triangle", "a purple circle"]), tok([""])
    schedule = NoiseSchedule.scaled_linear()
    g = torch.Generator().manual_seed(4)
    latents, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([3, 250, 600, 990])
    p = 0.5
    with torch.no_grad():
        package = train.noise_prediction_loss(model, latents, t, noise,
                                              train.caption_dropout(ids, empty, p, torch.Generator().manual_seed(7)),
                                              schedule)
        drop = torch.rand(4, generator=torch.Generator().manual_seed(7)) < p
        assert 0 < drop.sum() < 4, "the seed should drop some captions and keep others"
        mine = EX["training_loss"].reference(model, latents, ids, empty, t, noise, drop, schedule.alphas_cumprod)
    assert torch.allclose(mine, package, atol=1e-6)


def test_ema_update_step_after_step_is_train_ema():
    torch.manual_seed(1)
    net = torch.nn.Linear(3, 2)
    ema = train.EMA(net, decay=0.9)
    mine = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for step in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net, step)
        mine = EX["ema_update"].reference(mine, {k: v.clone() for k, v in net.state_dict().items()}, 0.9, step)
    for k in mine:
        assert torch.allclose(mine[k], ema.weights[k], atol=1e-6)


def test_a_learners_pieces_pass():
    def training_latents(mean, std, noise, scaling_factor):
        return (mean + std * noise) * scaling_factor

    def ema_update(ema_weights, weights, decay, step):
        d = min(decay, (1 + step) / (10 + step))
        return {k: ema_weights[k] + (1 - d) * (weights[k] - ema_weights[k]) for k in ema_weights}

    def training_loss(model, latents, ids, empty_ids, t, noise, drop, alphas_cumprod):
        ids = torch.where(drop[:, None], empty_ids.expand_as(ids), ids)
        a = alphas_cumprod[t][:, None, None, None]
        z_t = a.sqrt() * latents + (1 - a).sqrt() * noise
        return ((model(z_t, t, ids) - noise) ** 2).mean()

    for name, fn in [("training_latents", training_latents), ("ema_update", ema_update),
                     ("training_loss", training_loss)]:
        report = exercises.run_check(name, fn)
        assert report.passed, report.message
