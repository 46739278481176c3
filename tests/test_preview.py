"""The least-squares latent → RGB preview."""
import json

import numpy as np
import pytest
import torch

from reference import randomize_
from sdlearn.configs import VAEConfig
from sdlearn.preview import LatentPreview
from sdlearn.vae import AutoencoderKL


def shape_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Synthetic pictures in [-1, 1]: a plain background with one coloured rectangle."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, size, size)
    for img in out:
        img[:] = torch.rand(3, 1, 1, generator=g)
        y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        img[:, y0:y0 + size // 2, x0:x0 + size // 3] = torch.rand(3, 1, 1, generator=g)
    return out * 2 - 1


@pytest.fixture(scope="module")
def vae():
    return randomize_(AutoencoderKL(VAEConfig.tiny()), seed=3).eval()


def test_fit_recovers_a_known_linear_map_exactly():
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(3, 4, generator=g) - 0.5) * 0.2          # |W z| ≤ 0.4, so W z + b stays in [0.1, 0.9]
    b = torch.tensor([0.5, 0.45, 0.55])
    latents = torch.rand(2, 4, 6, 5, generator=g) * 2 - 1
    rgb = torch.einsum("oc,bchw->bohw", w, latents) + b[:, None, None]
    preview = LatentPreview.fit_pairs(latents, rgb)
    torch.testing.assert_close(preview.weight, w, rtol=0, atol=1e-6)
    torch.testing.assert_close(preview.bias, b, rtol=0, atol=1e-6)
    assert preview.rmse < 1e-6
    torch.testing.assert_close(preview(latents), rgb, rtol=0, atol=1e-6)


def test_fit_reports_the_rms_error_of_an_imperfect_fit():
    g = torch.Generator().manual_seed(1)
    latents = torch.rand(1, 4, 10, 10, generator=g) * 2 - 1
    noise = 0.05 * torch.randn(1, 3, 10, 10, generator=g)
    rgb = 0.5 + 0.1 * latents[:, :3] + noise
    preview = LatentPreview.fit_pairs(latents, rgb)
    # Least squares removes the part of the noise that is linear in [z, 1], so the error is a bit
    # below the noise's own RMS, and it is the RMS of what the preview actually shows.
    assert 0.8 * noise.pow(2).mean().sqrt() < preview.rmse < noise.pow(2).mean().sqrt()
    assert preview.rmse == pytest.approx((preview(latents) - rgb).pow(2).mean().sqrt().item(), rel=1e-6)


@pytest.mark.parametrize("target", ["images", "decoded"])
def test_fit_on_a_vae_pairs_diffusion_scale_latents_with_patch_colours(vae, target):
    images = shape_images(6, size=32)
    preview = LatentPreview.fit(vae, images, target=target, batch_size=4)
    # The same fit computed independently: latents × scaling_factor, 8×8 patch means, numpy lstsq.
    with torch.no_grad():
        z = vae.encode(images).mode()
        pixels = images if target == "images" else vae.decode(z).clamp(-1, 1)
    latents = (z * vae.scaling_factor).permute(0, 2, 3, 1).reshape(-1, 4).double().numpy()
    patches = ((pixels + 1) / 2).reshape(6, 3, 4, 8, 4, 8).mean(dim=(3, 5))
    colours = patches.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    solution, *_ = np.linalg.lstsq(np.c_[latents, np.ones(len(latents))], colours, rcond=None)
    np.testing.assert_allclose(preview.weight.numpy(), solution[:4].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(preview.bias.numpy(), solution[4], rtol=1e-4, atol=1e-5)
    shown = np.clip(np.c_[latents, np.ones(len(latents))] @ solution, 0, 1)
    assert preview.rmse == pytest.approx(np.sqrt(((shown - colours) ** 2).mean()), rel=1e-4)
    assert 0 < preview.rmse < colours.std()      # better than showing the mean colour everywhere


def test_preview_shapes_range_and_pil(vae):
    preview = LatentPreview.fit(vae, shape_images(4))
    latents = 3 * torch.randn(2, 4, 5, 7)           # wide enough to need the clamp
    rgb = preview(latents)
    assert rgb.shape == (2, 3, 5, 7) and rgb.min() >= 0 and rgb.max() <= 1
    assert torch.equal(preview.preview(latents), rgb)
    pils = preview.to_pil(latents, upscale=8)
    assert len(pils) == 2 and pils[0].size == (56, 40) and pils[0].mode == "RGB"
    small = np.asarray(preview.to_pil(latents)[1])
    np.testing.assert_array_equal(small, (rgb[1].permute(1, 2, 0) * 255).round().byte().numpy())
    np.testing.assert_array_equal(np.asarray(pils[1])[::8, ::8], small)


def test_state_dict_round_trips_through_json(vae):
    preview = LatentPreview.fit(vae, shape_images(3))
    restored = LatentPreview.from_state_dict(json.loads(json.dumps(preview.state_dict())))
    assert restored.rmse == preview.rmse
    latents = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(restored(latents), preview(latents), rtol=0, atol=1e-7)


def test_bad_inputs_get_clear_errors(vae):
    preview = LatentPreview(weight=torch.zeros(3, 4), bias=torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\); got \(1, 3, 2, 2\)"):
        preview(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="at least 5 latent pixels; got 4"):
        LatentPreview.fit_pairs(torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"same B, h, w; got \(1, 4, 2, 2\) and \(1, 3, 4, 4\)"):
        LatentPreview.fit_pairs(torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="weight \\(3, C\\)"):
        LatentPreview.from_state_dict({"weight": [[0.0] * 4] * 4, "bias": [0.0] * 3})
    with pytest.raises(ValueError, match="'images' or 'decoded'"):
        LatentPreview.fit(vae, shape_images(1), target="latents")


def test_fitting_images_are_generic_pictures_in_range():
    from sdlearn.preview import fitting_images
    images = fitting_images()
    assert images.shape == (49, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, fitting_images())                       # drawn from a fixed seed
    assert images.flatten(1).std(1).gt(0).sum() >= 20                  # gradients and shapes, not only flat fields


def test_fitting_a_preview_does_not_import_the_shapes_dataset():
    """A general model's preview is fitted on `fitting_images`, so the pipeline needs no toy dataset."""
    import subprocess
    import sys
    from checkpoints import original_file
    from sdlearn.configs import ModelConfig
    code = ("import sys, sdlearn; pipe = sdlearn.load_pipeline(sys.argv[1], device='cpu'); "
            "assert pipe.latent_preview.weight.shape == (3, 4); "
            "print(sorted(m for m in sys.modules if m in ('sdlearn.shapes', 'sdlearn.analyser', 'sdlearn.toy')))")
    out = subprocess.run([sys.executable, "-c", code, str(original_file(ModelConfig.tiny()))], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
