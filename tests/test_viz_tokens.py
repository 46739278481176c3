"""The plots of notebook 02: token labels and token-indexed heatmaps."""
import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from sdlearn import viz  # noqa: E402
from sdlearn.tokenizer import default_tokenizer  # noqa: E402


def test_token_labels_strip_word_ends_and_name_the_specials():
    tok = default_tokenizer()
    ids = tok("a red cat,")[0, :8]
    assert viz.token_labels(tok, ids) == ["<start>", "a", "red", "cat", ",", "<end>", "<end>", "<end>"]
    assert viz.token_labels(tok, [1481]) == ["cat"]          # a word-inner piece has no </w> to strip


def test_plot_token_heatmaps_draws_each_matrix_with_token_ticks_on_one_scale():
    a, b = torch.rand(3, 3), torch.rand(3, 3) + 1
    fig = viz.plot_token_heatmaps([a, b], ["x", "y", "z"], titles=["A", "B"])
    panels = [ax for ax in fig.axes if ax.images and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["A", "B"]
    for ax, mat in zip(panels, (a, b)):
        assert torch.equal(torch.as_tensor(ax.images[0].get_array().data), mat)
        assert ax.images[0].get_clim() == pytest.approx((float(a.min()), float(b.max())))
        assert [t.get_text() for t in ax.get_yticklabels()] == ["x", "y", "z"]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y", "z"]


def test_plot_token_heatmaps_takes_a_stack_and_separate_column_labels():
    fig = viz.plot_token_heatmaps(torch.zeros(2, 2, 3), ["q1", "q2"], col_labels=["k1", "k2", "k3"],
                                  vmin=0, vmax=1, colorbar=False)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 and panels[0].images[0].get_clim() == (0, 1)
    assert [t.get_text() for t in panels[1].get_xticklabels()] == ["k1", "k2", "k3"]


def test_plot_token_heatmaps_refuses_mismatched_labels_and_shapes():
    with pytest.raises(ValueError, match="one label per token"):
        viz.plot_token_heatmaps(torch.zeros(3, 3), ["a", "b"])
    with pytest.raises(ValueError, match="one shape"):
        viz.plot_token_heatmaps([torch.zeros(3, 3), torch.zeros(2, 2)])
    with pytest.raises(ValueError, match="one title per matrix"):
        viz.plot_token_heatmaps(torch.zeros(3, 3), titles=["a", "b"])
