"""`sdlearn generate` end to end, with a random tiny checkpoint passed through --weights."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import original_file
from sdlearn import shapes
from sdlearn.cli import main
from sdlearn.configs import ModelConfig
from sdlearn.pipeline import load_pipeline
pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py

TINY = ModelConfig.tiny()
FAST = ["--steps", "2", "--sampler", "ddim", "-q"]


@pytest.fixture(scope="module")
def weights() -> str:
    return str(original_file(TINY))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_writes_a_png_with_prompt_and_settings_in_its_metadata(weights, tmp_path, capsys):
    out = tmp_path / "red.png"
    code, stdout, _ = run(capsys, "generate", "a red circle", "--negative", "blue", "--seed", 3, "--guidance", 5,
                          "--weights", weights, "-o", out, *FAST)
    assert code == 0 and stdout.strip() == str(out)
    with Image.open(out) as img:
        text, pixels = dict(img.text), torch.from_numpy(np.asarray(img.convert("RGB")))
    assert text["prompt"] == "a red circle" and text["negative_prompt"] == "blue"
    assert (text["seed"], text["sampler"], text["steps"], text["guidance"], text["size"]) == ("3", "ddim", "2", "5.0", "64x64")
    assert text["weights"] == weights and text["Software"].startswith("sdlearn ")
    # The file holds exactly what the API makes with these settings.
    api = load_pipeline(weights, "cpu").generate("a red circle", negative_prompt="blue", seed=3, guidance=5,
                                                  steps=2, sampler="ddim", progress=False)
    assert torch.equal(pixels, torch.from_numpy(np.asarray(api.images[0])))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["red.png"]          # no temporary left


def test_never_overwrites_unless_forced(weights, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert run(capsys, "generate", "a red circle", "--seed", 1, "--weights", weights, "-o", out, *FAST)[0] == 0
    before = out.read_bytes()
    code, _, err = run(capsys, "generate", "a blue square", "--seed", 2, "--weights", weights, "-o", out, *FAST)
    assert code == 2 and "x.png already exists" in err and "--force" in err and err.count("\n") == 1
    assert out.read_bytes() == before
    assert run(capsys, "generate", "a blue square", "--seed", 2, "--weights", weights, "-o", out, "--force", *FAST)[0] == 0
    assert out.read_bytes() != before
    with Image.open(out) as img:
        assert img.text["prompt"] == "a blue square"


def test_several_pictures_and_default_names(weights, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = run(capsys, "generate", "a green triangle", "-n", 2, "--seed", 4, "--weights", weights, *FAST)
    assert code == 0 and stdout.split() == ["sdlearn-4-0.png", "sdlearn-4-1.png"]
    with Image.open("sdlearn-4-1.png") as img:
        assert img.text["batch_index"].startswith("1 of 2") and img.size == (64, 64)
    (tmp_path / "pics").mkdir()
    code, stdout, _ = run(capsys, "generate", "a green triangle", "--seed", 4, "--weights", weights, "-o", "pics", *FAST)
    assert code == 0 and stdout.strip() == "pics/sdlearn-4.png"
    # One of the n names taken: nothing is generated, nothing written.
    code, _, err = run(capsys, "generate", "a green triangle", "-n", 2, "--seed", 4, "--weights", weights, *FAST)
    assert code == 2 and "sdlearn-4-0.png, sdlearn-4-1.png already exist" in err


def test_bad_size_is_refused(weights, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a red circle", "--size", "64", "--weights", weights])
    assert exit_.value.code == 2 and "expected WIDTHxHEIGHT such as 512x512; got '64'" in capsys.readouterr().err
    code, _, err = run(capsys, "generate", "a red circle", "--size", "60x64", "--weights", weights, "-o",
                       tmp_path / "a.png", *FAST)
    assert code == 2 and "width=60 is not a multiple of 8" in err and not (tmp_path / "a.png").exists()
    code, _, _ = run(capsys, "generate", "a red circle", "--size", "32x48", "--weights", weights, "-o",
                     tmp_path / "b.png", *FAST)
    with Image.open(tmp_path / "b.png") as img:
        assert code == 0 and img.size == (32, 48)


def test_image_to_image_and_inpainting(weights, tmp_path, capsys):
    shapes.sample(2).pil.save(tmp_path / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(tmp_path / "mask.png")
    code, _, _ = run(capsys, "generate", "a red circle", "--image", tmp_path / "in.png", "--strength", 0.5,
                     "--mask", tmp_path / "mask.png", "--seed", 0, "--weights", weights, "-o", tmp_path / "out.png", *FAST)
    assert code == 0
    with Image.open(tmp_path / "out.png") as img:
        assert (img.text["image"], img.text["mask"], img.text["strength"]) == ("in.png", "mask.png", "0.5")
    code, _, err = run(capsys, "generate", "a red circle", "--mask", tmp_path / "mask.png", "--weights", weights)
    assert code == 2 and "--mask needs --image" in err
    (tmp_path / "junk.png").write_text("not a picture")
    code, _, err = run(capsys, "generate", "a red circle", "--image", tmp_path / "junk.png", "--weights", weights,
                       "-o", tmp_path / "o2.png")
    assert code == 2 and "junk.png: not a picture" in err


def test_an_interrupted_write_leaves_nothing(weights, tmp_path, capsys, monkeypatch):
    real_save = Image.Image.save

    def save_then_interrupt(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)          # the bytes reach the temporary file …
        raise KeyboardInterrupt                       # … and then the user presses Ctrl-C

    monkeypatch.setattr(Image.Image, "save", save_then_interrupt)
    code, _, err = run(capsys, "generate", "a red circle", "--weights", weights, "-o", tmp_path / "x.png", *FAST)
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_default_weights_come_from_sdlearn_weights(weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDLEARN_WEIGHTS", weights)
    code, _, _ = run(capsys, "generate", "a red circle", "--seed", 0, "-o", tmp_path / "a.png", *FAST)
    with Image.open(tmp_path / "a.png") as img:
        assert code == 0 and img.text["weights"] == weights


def test_python_dash_m_sdlearn_generate(weights, tmp_path):
    out = tmp_path / "sub.png"
    proc = subprocess.run([sys.executable, "-m", "sdlearn", "generate", "a yellow square at the top", "--seed", "5",
                           "--weights", weights, "-o", str(out), *FAST], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    with Image.open(out) as img:
        assert img.text["prompt"] == "a yellow square at the top" and img.text["seed"] == "5"


def test_train_is_handed_to_sdlearn_train(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "-h"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sdlearn train") and "vae" in out and "export" in out
