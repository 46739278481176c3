"""The plain plotting functions behind the notebooks' figures (those without a home elsewhere)."""
import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from sdlearn import viz  # noqa: E402


def test_plot_latent_channels_draws_each_channel_on_one_symmetric_scale():
    z = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    z[0, 2, 1, 1] = -7.0                                   # the largest magnitude sets the scale
    fig = viz.plot_latent_channels(z, titles=["a", "b", "c", "d"])
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["a", "b", "c", "d"]
    for i, ax in enumerate(panels):
        shown = ax.images[0]
        assert torch.equal(torch.as_tensor(shown.get_array().data), z[0, i])
        assert shown.get_clim() == (-7.0, 7.0)


def test_plot_latent_channels_shows_the_image_first():
    image = torch.rand(3, 48, 40)
    fig = viz.plot_latent_channels(torch.randn(4, 6, 5), image)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert panels[0].get_title() == "image" and panels[0].images[0].get_array().shape == (48, 40, 3)
    assert len(panels) == 5


def test_plot_latent_channels_refuses_a_batch_and_wrong_titles():
    with pytest.raises(ValueError, match=r"one latent \(C, h, w\)"):
        viz.plot_latent_channels(torch.randn(2, 4, 6, 5))
    with pytest.raises(ValueError, match="one title per channel"):
        viz.plot_latent_channels(torch.randn(4, 6, 5), titles=["x"])
