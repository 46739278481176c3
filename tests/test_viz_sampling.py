"""The plots of notebooks 06 and 07: labelled image tables and attention-map overlays."""
import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from sdlearn import viz  # noqa: E402
from sdlearn.attention_maps import WordMaps  # noqa: E402


def test_image_table_lays_out_labelled_rows_and_titled_columns():
    red, blue = torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)
    red[0], blue[2] = 1, 1
    fig = viz.image_table({"ddim": [red, blue, None], "euler": [blue, red, red]}, ["10", "25", "50"],
                          captions={"euler": ["a", "b", "c"]})
    axes = np.array(fig.axes).reshape(2, 3)
    assert [ax.get_title() for ax in axes[0]] == ["10", "25", "50"]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["ddim", "euler"]
    assert [ax.get_xlabel() for ax in axes[1]] == ["a", "b", "c"]
    assert not axes[0][2].images                                   # None leaves the cell empty
    assert axes[0][0].images[0].get_array()[0, 0].tolist() == [255, 0, 0]
    assert axes[1][0].images[0].get_array()[0, 0].tolist() == [0, 0, 255]


def test_image_table_refuses_ragged_rows_and_wrong_titles():
    im = torch.zeros(3, 2, 2)
    with pytest.raises(ValueError, match="rows of one length"):
        viz.image_table({"a": [im, im], "b": [im]})
    with pytest.raises(ValueError, match="one per column"):
        viz.image_table({"a": [im, im]}, ["only one"])
    with pytest.raises(ValueError, match="captions"):
        viz.image_table({"a": [im, im]}, captions={"b": ["x", "y"]})


def test_heatmap_overlay_blends_the_coloured_map_over_the_image():
    image = torch.full((3, 8, 8), 0.5)
    heat = torch.zeros(8, 8)
    heat[2, 3] = 4.0                                               # normalised by its maximum → 1
    out = viz.heatmap_overlay(image, heat, alpha=0.6, cmap="gray")
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert out[2, 3].tolist() == [round(255 * (0.6 + 0.4 * 0.5))] * 3       # white blended
    assert out[0, 0].tolist() == [round(255 * 0.4 * 0.5)] * 3                # black blended
    assert np.array_equal(viz.heatmap_overlay(image, heat, alpha=0.0), viz.to_uint8(image))
    half = viz.heatmap_overlay(image, heat, alpha=1.0, cmap="gray", vmax=8.0)
    assert half[2, 3].tolist() == [128] * 3                                  # 4 / vmax 8 = grey


def test_heatmap_overlay_spans_the_maps_own_range_unless_told():
    heat = torch.full((4, 4), 2.0)
    heat[0, 0], heat[3, 3] = 1.0, 3.0
    out = viz.heatmap_overlay(torch.zeros(3, 4, 4), heat, alpha=1.0, cmap="gray")
    assert (out[0, 0, 0], out[1, 1, 0], out[3, 3, 0]) == (0, 128, 255)     # min → 0, max → 1
    fixed = viz.heatmap_overlay(torch.zeros(3, 4, 4), heat, alpha=1.0, cmap="gray", vmin=0.0, vmax=4.0)
    assert (fixed[0, 0, 0], fixed[3, 3, 0]) == (64, 192)
    flat = viz.heatmap_overlay(torch.zeros(3, 4, 4), torch.ones(4, 4), alpha=1.0, cmap="gray")
    assert (flat == 0).all()                                                 # no range: all at the bottom


def test_heatmap_overlay_upsamples_a_coarse_map_to_the_image():
    heat = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    out = viz.heatmap_overlay(torch.zeros(3, 16, 16), heat, alpha=1.0, cmap="gray")
    assert out.shape == (16, 16, 3)
    assert out[0, 15, 0] == 255 and out[15, 0, 0] == 0            # the hot corner stays top right
    with pytest.raises(ValueError, match=r"heat map \(h, w\)"):
        viz.heatmap_overlay(torch.zeros(3, 4, 4), torch.zeros(1, 4, 4))


def test_plot_word_maps_titles_each_word_with_its_share_of_attention():
    maps = torch.zeros(3, 8, 8)
    maps[0] += 0.25
    maps[1, :4] = 0.2                                              # mean 0.1
    maps[2, 0, 0] = 0.64                                           # mean 0.01
    wm = WordMaps("a red circle", ["a", "red", "circle"], maps, torch.zeros(77, 8, 8), [[1], [2], [3]])
    fig = viz.plot_word_maps(torch.rand(3, 8, 8), wm, ["red", 2])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["image", "red\n10.0 %", "circle\n1.0 %"]
    assert all(ax.images[0].get_array().shape == (8, 8, 3) for ax in fig.axes)
