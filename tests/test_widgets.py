"""Attention maps split by step and by layer, and the guidance explorer behind notebook 07."""
import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from checkpoints import original_file  # noqa: E402
from sdlearn import load_pipeline  # noqa: E402
from sdlearn.configs import ModelConfig  # noqa: E402
from sdlearn.widgets import (GuidanceExplorer, attention_by_layer, attention_over_steps,  # noqa: E402
                             cross_attention_tags, mass_inside, prompt_words)

PROMPT = "a large red circle on the left"


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(original_file(ModelConfig.tiny()), "cpu", torch.float32)


def whole_run(pipe, **kw):
    return pipe.generate(PROMPT, attention_maps=True, progress=False, **kw)


@pytest.mark.parametrize("guidance", [7.5, 1.0])      # with and without the unconditional half
def test_step_windows_add_up_to_the_whole_run(pipe, guidance):
    kw = dict(seed=3, steps=7, guidance=guidance, sampler="ddim")
    result, windows = attention_over_steps(pipe, PROMPT, every=3, **kw)
    whole = whole_run(pipe, **kw)
    assert [w.steps for w in windows] == [range(0, 3), range(3, 6), range(6, 7)]
    assert torch.equal(result.pixels, whole.pixels)          # recording changes nothing
    mean = sum(len(w.steps) * w.maps.tokens for w in windows) / 7
    torch.testing.assert_close(mean, whole.attention_maps[0].tokens, rtol=1e-4, atol=1e-6)
    assert windows[0].maps.words == whole.attention_maps[0].words
    for w in windows:
        torch.testing.assert_close(w.maps.tokens.sum(0), torch.ones(64, 64), rtol=0, atol=1e-4)
    assert not torch.allclose(windows[0].maps.tokens, windows[-1].maps.tokens)   # the windows differ


def test_step_windows_follow_an_img2img_run_and_its_size(pipe):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result, windows = attention_over_steps(pipe, PROMPT, every=2, seed=0, steps=10, image=image, strength=0.5,
                                           sampler="ddim")
    assert result.steps_done == 5
    assert [w.steps for w in windows] == [range(0, 2), range(2, 4), range(4, 5)]
    assert windows[0].maps.maps.shape == (len(windows[0].maps.words), 64, 64)


@pytest.mark.parametrize("split", [attention_over_steps, attention_by_layer])
def test_an_image_given_as_a_path_is_opened_once(pipe, split, tmp_path, monkeypatch):
    from sdlearn import images
    path = tmp_path / "start.png"
    images.to_pil(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))[0].save(path)
    opened = []
    real = images.open_image
    monkeypatch.setattr(images, "open_image", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    split(pipe, PROMPT, seed=0, steps=4, image=str(path), strength=0.5, sampler="ddim")
    assert opened == [str(path)]


def test_layer_maps_average_to_the_whole_run(pipe):
    kw = dict(seed=1, steps=4, guidance=5.0)
    result, layers = attention_by_layer(pipe, PROMPT, **kw)
    whole = whole_run(pipe, **kw)
    tags = cross_attention_tags(pipe.unet)
    # tiny UNet: one transformer per level going down (8×8, 4×4), one in the middle (4×4),
    # two per level going up (4×4, then 8×8): 2 + 1 + 4 = 7 layers
    assert [layer.tag for layer in layers] == tags and len(tags) == 7
    assert all(t.endswith("attn2") for t in tags)
    assert [layer.size for layer in layers] == [(8, 8), (4, 4), (4, 4), (4, 4), (4, 4), (8, 8), (8, 8)]
    assert torch.equal(result.pixels, whole.pixels)
    mean = torch.stack([layer.maps.tokens for layer in layers]).mean(0)
    torch.testing.assert_close(mean, whole.attention_maps[0].tokens, rtol=1e-4, atol=1e-6)


def test_splitting_refuses_batches_and_its_own_arguments(pipe):
    with pytest.raises(ValueError, match="one prompt"):
        attention_over_steps(pipe, [PROMPT, PROMPT], steps=2)
    with pytest.raises(ValueError, match="one prompt"):
        attention_by_layer(pipe, PROMPT, num_images=2, steps=2)
    with pytest.raises(ValueError, match="leave them out"):
        attention_by_layer(pipe, PROMPT, attention_maps=True, steps=2)
    with pytest.raises(ValueError, match="positive"):
        attention_over_steps(pipe, PROMPT, every=0, steps=2)


def test_mass_inside_is_the_share_of_the_map_in_the_region():
    heat = torch.zeros(4, 4)
    heat[0, 0], heat[3, 3] = 3.0, 1.0
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[:2, :2] = True
    assert mass_inside(heat, region) == pytest.approx(0.75)
    assert mass_inside(torch.ones(4, 4), region) == pytest.approx(region.float().mean().item())
    with pytest.raises(ValueError, match="one size"):
        mass_inside(heat, region[:2])


def test_prompt_words_are_the_words_with_maps(pipe):
    assert prompt_words(pipe.tokenizer, "a red circle, left") == ["a", "red", "circle", ",", "left"]


def test_explorer_caches_runs_and_draws_the_chosen_word(pipe):
    ex = GuidanceExplorer(pipe)
    fig = ex.figure(PROMPT, guidance=4.0, steps=3, seed=0, word="red")
    assert ex.runs == 1
    result = ex.run(PROMPT, 4.0, 3, 0)
    assert torch.equal(result.pixels, pipe.generate(PROMPT, guidance=4.0, steps=3, seed=0, progress=False).pixels)
    assert "'red'" in fig.axes[1].get_title() and len(fig.axes) == 2
    ex.figure(PROMPT, guidance=4.0, steps=3, seed=0, word=4)       # another word: no new run
    assert ex.runs == 1
    ex.figure(PROMPT, guidance=5.0, steps=3, seed=0, word="red")
    assert ex.runs == 2
    with pytest.raises(KeyError, match="not a word"):
        ex.figure(PROMPT, guidance=4.0, steps=3, seed=0, word="blue")
    with pytest.raises(IndexError, match="out of range"):
        ex.figure(PROMPT, guidance=4.0, steps=3, seed=0, word=7)


def test_explorer_sweep_shows_one_column_per_guidance(pipe):
    ex = GuidanceExplorer(pipe, cache_size=2)
    fig = ex.sweep_figure(PROMPT, [1.0, 3.0, 6.0], steps=2, seed=0, word="circle")
    assert [ax.get_title() for ax in fig.axes[:3]] == ["g = 1", "g = 3", "g = 6"]
    assert [fig.axes[i].get_ylabel() for i in (0, 3)] == ["image", "'circle'"]
    assert ex.runs == 3 and len(ex._cache) == 2                  # the oldest run was dropped


def test_explorer_widget_reruns_on_settings_and_only_redraws_for_a_word(pipe):
    pytest.importorskip("ipywidgets")
    ex = GuidanceExplorer(pipe)
    box = ex.widget(PROMPT, guidance=3.0, steps=2, seed=0, word="red")
    c = box.controls
    labels = [label for label, _ in c["word"].options]
    assert labels == prompt_words(pipe.tokenizer, PROMPT) and labels[c["word"].value] == "red"
    assert (ex.runs, box.figures) == (1, 1)
    c["word"].value = 3                                           # "circle": redraw, no new run
    assert (ex.runs, box.figures) == (1, 2)
    c["guidance"].value = 6.0
    assert (ex.runs, box.figures) == (2, 3)
    c["prompt"].value = "a small blue circle at the top"          # new words, "circle" kept, one redraw
    labels = [label for label, _ in c["word"].options]
    assert labels == ["a", "small", "blue", "circle", "at", "the", "top"] and labels[c["word"].value] == "circle"
    assert (ex.runs, box.figures) == (3, 4)
    c["prompt"].value = "green square"                            # "circle" gone: the last word
    assert [label for label, _ in c["word"].options][c["word"].value] == "square"
