"""Notebook 00's diagram of the whole pipeline: the shapes on its arrows are the ones a run has."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from checkpoints import original_file  # noqa: E402
from sdlearn import figures, load_pipeline  # noqa: E402
from sdlearn.configs import ModelConfig  # noqa: E402


def test_sd15_shapes():
    assert figures.pipeline_shapes(ModelConfig.sd15()) == {
        "tokens": (1, 77), "text": (1, 77, 768), "latents": (1, 4, 64, 64), "picture": (1, 3, 512, 512)}


def test_tiny_shapes_are_those_of_a_real_run():
    torch.set_num_threads(1)
    config = ModelConfig.tiny()
    pipe = load_pipeline(original_file(config), "cpu", torch.float32)
    shapes = figures.pipeline_shapes(config)
    ids = pipe.tokenizer(["a red circle"])
    assert tuple(ids.shape) == shapes["tokens"]
    with torch.no_grad():
        assert tuple(pipe.text_encoder(ids).shape) == shapes["text"]
    latents = []
    result = pipe.generate("a red circle", seed=0, steps=2, guidance=1.0, progress=False,
                           callback=lambda info: latents.append(tuple(info.latents.shape)))
    assert latents[0] == shapes["latents"] and tuple(result.pixels.shape) == shapes["picture"]


def test_the_diagram_shows_every_stage_and_both_sets_of_shapes():
    fig = figures.pipeline_diagram()
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    for stage in ("tokenizer", "text encoder", "UNet", "sampler", "VAE decoder", "picture"):
        assert stage in texts
    for shapes in (figures.pipeline_shapes(ModelConfig.sd15()), figures.pipeline_shapes(ModelConfig.tiny())):
        for shape in shapes.values():
            assert str(shape) in texts
    plt.close(fig)
