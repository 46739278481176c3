"""`Pipeline.generate` against diffusers' Stable Diffusion pipelines, with the same random weights.

Tiny config by default (64×64 images, a few steps); SD v1.5 size at 256×256, 6 steps, under
`make test-full`. Bounds: the final latents within 1e-5 relative error, the pixels within 2e-3
(max |difference| on the [0, 1] scale).
"""
from __future__ import annotations

import json
import time
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from checkpoints import diffusers_from_original, diffusers_pipeline, original_file
from reference import rel_err
from test_clip import transformers_state_dict
from test_samplers import reference_scheduler
from sdlearn import shapes
from sdlearn.configs import ModelConfig
from sdlearn.pipeline import GenerationResult, Pipeline, StopGeneration, load_pipeline
from sdlearn.sources import metadata_defaults

TINY = ModelConfig.tiny()
TOL = 2e-3            # pixels, max |difference| on the [0, 1] scale
LATENT_TOL = 1e-5     # final latents, relative error
PROMPTS = ["a red circle on the left", "a small blue square at the top"]
NEGATIVE = "a green triangle"
SAMPLERS = ["ddim", "pndm", "euler", "dpmpp_2m", "euler_a", "ddpm"]
STOCHASTIC = {"euler_a", "ddpm"}
THREADS = torch.get_num_threads()


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


@pytest.fixture(scope="module")
def ours() -> Pipeline:
    return load_pipeline(original_file(TINY), "cpu", torch.float32)


@pytest.fixture(scope="module")
def ref():
    pipe = diffusers_from_original(TINY)
    pipe.tokenizer.model_max_length = 77     # the saved test tokenizer forgot its limit
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Reference(NamedTuple):
    pixels: torch.Tensor      # (B, 3, H, W) in [0, 1]
    latents: torch.Tensor     # the final latents, before the VAE


def reference_run(pipe, sampler: str, **kw) -> Reference:
    """A diffusers pipeline run with the SD v1.5 scheduler of this kind: its final latents, and the
    pixels its own VAE and post-processing make of them (what output_type="pt" would return)."""
    pipe.scheduler = reference_scheduler(sampler)
    pipe.set_progress_bar_config(disable=True)
    prompts = kw.pop("prompt", PROMPTS)
    latents = pipe(prompts, negative_prompt=[NEGATIVE] * len(prompts), guidance_scale=kw.pop("guidance", 7.5),
                   output_type="latent", **kw).images
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return Reference(pipe.image_processor.postprocess(decoded, output_type="pt").float(), latents)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_matches(got, expected: Reference, label: str, latent_tol: float = LATENT_TOL) -> None:
    """The final latents (before the VAE, before any clamping) within `latent_tol` relative error,
    and the pixels within TOL."""
    lat, pix = rel_err(got.latents, expected.latents), max_diff(got.pixels, expected.pixels)
    print(f"{label}: latents rel. err {lat:.2e}, max |Δpixel| {pix:.2e}")
    assert lat <= latent_tol, f"{label}: latents relative error {lat:.2e} > {latent_tol:g}"
    assert pix <= TOL, f"{label}: max pixel difference {pix:.2e} > {TOL:g}"


def unit_noise(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=dtype)


# -- text to image ---------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_generate_matches_diffusers(ours, ref, sampler):
    """Deterministic samplers from the same `latents`; stochastic ones from the same seed (the
    generator then also feeds every step's noise, in diffusers' order)."""
    if sampler in STOCHASTIC:
        expected = reference_run(ref, sampler, num_inference_steps=5, generator=torch.Generator().manual_seed(7))
        got = ours.generate(PROMPTS, negative_prompt=NEGATIVE, steps=5, sampler=sampler, seed=7, progress=False)
    else:
        noise = unit_noise((2, 4, 8, 8), seed=7)
        expected = reference_run(ref, sampler, num_inference_steps=5, latents=noise)
        got = ours.generate(PROMPTS, negative_prompt=NEGATIVE, steps=5, sampler=sampler, latents=noise,
                            progress=False)
    assert_matches(got, expected, sampler)
    assert got.pixels.dtype == torch.float32 and got.pixels.device.type == "cpu"


def test_generate_matches_diffusers_at_a_non_square_size_without_guidance(ours, ref):
    noise = unit_noise((1, 4, 6, 4), seed=1)
    expected = reference_run(ref, "ddim", prompt=PROMPTS[:1], num_inference_steps=4, latents=noise,
                             height=48, width=32, guidance=1.0)
    got = ours.generate(PROMPTS[0], steps=4, sampler="ddim", latents=noise, guidance=1.0, progress=False)
    assert got.pixels.shape == (1, 3, 48, 32)
    assert_matches(got, expected, "ddim 48×32, guidance 1")


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_generate_matches_diffusers_at_sides_that_are_only_multiples_of_8(ours, ref, sampler):
    """72×88 pixels are 9×11 latents: odd at the UNet's halving, which rounds up on the way down
    and back to the skip's size on the way up, as diffusers does."""
    noise = unit_noise((2, 4, 9, 11), seed=3)
    expected = reference_run(ref, sampler, num_inference_steps=4, latents=noise, height=72, width=88)
    got = ours.generate(PROMPTS, negative_prompt=NEGATIVE, steps=4, sampler=sampler, latents=noise,
                        progress=False)
    assert got.pixels.shape == (2, 3, 72, 88)
    assert_matches(got, expected, f"{sampler} 72×88")


def test_seed_gives_the_noise_of_a_seeded_cpu_generator(ours):
    a = ours.generate(PROMPTS[0], steps=3, sampler="ddim", seed=11, progress=False)
    b = ours.generate(PROMPTS[0], steps=3, sampler="ddim", latents=unit_noise((1, 4, 8, 8), seed=11), progress=False)
    assert torch.equal(a.pixels, b.pixels) and a.seed == 11


def test_same_seed_twice_gives_identical_pixels(ours):
    run = lambda seed: ours.generate(PROMPTS, steps=3, sampler="euler_a", seed=seed, progress=False).pixels
    first = run(5)
    assert torch.equal(first, run(5))
    assert max_diff(first, run(6)) > 0.01


def test_num_images_is_the_prompt_repeated(ours):
    a = ours.generate(PROMPTS[0], num_images=2, steps=3, sampler="ddim", seed=2, progress=False)
    b = ours.generate([PROMPTS[0]] * 2, steps=3, sampler="ddim", seed=2, progress=False)
    assert len(a.images) == 2 and torch.equal(a.pixels, b.pixels)
    assert max_diff(a.pixels[0], a.pixels[1]) > 0.01          # different noise per image


def test_guidance_runs_both_halves_as_one_batch_and_the_prompt_is_encoded_once(ours):
    unet_batches, text_calls = [], []
    hooks = [ours.unet.register_forward_hook(lambda m, args, out: unet_batches.append(args[0].shape[0])),
             ours.text_encoder.register_forward_hook(lambda m, args, out: text_calls.append(args[0].shape[0]))]
    try:
        ours.generate(PROMPTS, negative_prompt=NEGATIVE, steps=4, sampler="ddim", seed=0, progress=False)
        assert unet_batches == [4] * 4 and text_calls == [4]
        unet_batches.clear(), text_calls.clear()
        with pytest.warns(UserWarning, match="negative_prompt is not used"):
            ours.generate(PROMPTS, negative_prompt=NEGATIVE, guidance=1.0, steps=4, sampler="ddim", seed=0,
                          progress=False)
        assert unet_batches == [2] * 4 and text_calls == [2]
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("sampler", ["pndm", "euler_a"])
def test_generate_is_the_sampling_loop_plus_guidance(ours, sampler, monkeypatch):
    """What generate does equals samplers.sample_loop driven by hand with the pipeline's guided
    ε-model, to the bit, and generate reaches its latents through that very function."""
    from sdlearn import pipeline as pipeline_module
    from sdlearn.pipeline import classifier_free_guidance
    from sdlearn.samplers import get_sampler, sample_loop

    calls = []
    monkeypatch.setattr(pipeline_module, "sample_loop", lambda *a, **k: calls.append(1) or sample_loop(*a, **k))
    result = ours.generate(PROMPTS, negative_prompt=NEGATIVE, steps=4, sampler=sampler, seed=5, progress=False)
    assert calls == [1]

    with torch.inference_mode():
        context = ours.text_encoder(ours.tokenizer([NEGATIVE] * 2 + PROMPTS))      # [unconditional; conditional]

        def guided(x_in, t):
            eps_uncond, eps_cond = ours.unet(torch.cat([x_in, x_in]), t, context).chunk(2)
            return eps_uncond + 7.5 * (eps_cond - eps_uncond)

        generator = torch.Generator().manual_seed(5)
        sampler_ = get_sampler(sampler)
        sampler_.set_timesteps(4)
        noise = torch.randn((2, 4, 8, 8), generator=generator)
        by_hand = sample_loop(sampler_, guided, noise * sampler_.init_noise_sigma, sampler_.timesteps,
                              generator=generator)
    assert torch.equal(result.latents, by_hand.x)
    e_u, e_c = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(classifier_free_guidance(e_u, e_c, 1.0), e_c)            # g = 1: the conditional ε
    torch.testing.assert_close(classifier_free_guidance(e_u, e_c, 3.0), 3 * e_c - 2 * e_u)


# -- image to image, inpainting ----------------------------------------------------------------

@pytest.fixture(scope="module")
def picture() -> Image.Image:
    return shapes.sample(5).pil


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (8, 16, 40, 48))
    return m


@pytest.fixture(scope="module")
def picture_tensor(picture) -> torch.Tensor:
    """The same picture as a contiguous (1, 3, H, W) tensor in [0, 1] (see the next test's docstring)."""
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1)[None].float().div(255).contiguous()


@pytest.mark.parametrize("sampler, strength", [("ddim", 0.6), ("pndm", 0.6), ("euler", 0.6), ("dpmpp_2m", 0.6),
                                               ("euler_a", 0.6), ("ddim", 1.0)])
def test_img2img_matches_diffusers(ours, ref, picture_tensor, sampler, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**ref.components)
    expected = reference_run(pipe, sampler, image=picture_tensor, strength=strength, num_inference_steps=5,
                             generator=torch.Generator().manual_seed(3))
    got = ours.generate(PROMPTS, negative_prompt=NEGATIVE, steps=5, sampler=sampler, seed=3, image=picture_tensor,
                        strength=strength, progress=False)
    assert_matches(got, expected, f"img2img {sampler} strength {strength}")
    assert got.steps_done == int(5 * strength) + (sampler == "pndm" and strength < 1)   # PNDM repeats a timestep


def test_img2img_from_a_pil_picture_matches_diffusers(ours, ref, picture):
    """From a PIL picture the latents agree to ~2e-4, not ~1e-6: diffusers' preprocessed picture has
    strides that send PyTorch's CPU GroupNorm down its channels-last kernel, whose one-pass
    variance loses precision on flat colour regions; its encoder mean is then off by 9e-4 from a
    float64 encode, ours (a contiguous input) by 3e-6. Given the same picture as a contiguous
    tensor (the test above), the two agree to float32 rounding."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**ref.components)
    expected = reference_run(pipe, "euler", image=picture, strength=0.6, num_inference_steps=5,
                             generator=torch.Generator().manual_seed(3))
    got = ours.generate(PROMPTS, negative_prompt=NEGATIVE, steps=5, sampler="euler", seed=3, image=picture,
                        strength=0.6, progress=False)
    assert_matches(got, expected, "img2img from PIL", latent_tol=1e-3)


@pytest.mark.parametrize("sampler, strength", [("ddim", 1.0), ("euler", 0.6), ("euler_a", 0.6)])
def test_inpainting_matches_diffusers_with_a_4_channel_unet(ours, ref, picture_tensor, mask, sampler, strength):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(**ref.components)
    expected = reference_run(pipe, sampler, image=picture_tensor, mask_image=mask, strength=strength,
                             num_inference_steps=5, generator=torch.Generator().manual_seed(4))
    got = ours.generate(PROMPTS, negative_prompt=NEGATIVE, steps=5, sampler=sampler, seed=4, image=picture_tensor,
                        mask=mask, strength=strength, progress=False)
    assert_matches(got, expected, f"inpaint {sampler} strength {strength}")


def test_inpainting_keeps_the_known_latents_exactly(ours, picture, mask):
    got = ours.generate(PROMPTS[0], steps=4, sampler="ddim", seed=9, image=picture, mask=mask, progress=False)
    from sdlearn.images import image_to_tensor
    z = ours.vae.encode(image_to_tensor(picture, 64, 64)).sample(torch.Generator().manual_seed(9))
    z = z * ours.vae.scaling_factor
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[2:6, 1:5] = False                               # the mask's box (8…40, 16…48) / 8
    torch.testing.assert_close(got.latents[0][:, keep], z[0][:, keep], rtol=0, atol=1e-6)
    assert (got.latents[0][:, ~keep] - z[0][:, ~keep]).abs().max() > 0.1


# -- loading: folder, single file, float16 -----------------------------------------------------

def test_diffusers_folder_single_file_and_float16_file_agree(ours, ref, tmp_path):
    folder = tmp_path / "same-weights"
    ref.save_pretrained(folder)
    kw = dict(steps=4, sampler="euler", seed=1, progress=False)
    base = ours.generate(PROMPTS, negative_prompt=NEGATIVE, **kw).pixels
    from_folder = load_pipeline(folder, "cpu", torch.float32).generate(PROMPTS, negative_prompt=NEGATIVE, **kw)
    assert max_diff(from_folder.pixels, base) <= 1e-5
    half_file = original_file(TINY, dtype=torch.float16)
    as_float32 = load_pipeline(half_file, "cpu", torch.float32)
    err32 = max_diff(as_float32.generate(PROMPTS, negative_prompt=NEGATIVE, **kw).pixels, base)
    half = load_pipeline(half_file, "cpu", torch.float16)
    assert half.unet.conv_in.weight.dtype == torch.float16
    result = half.generate(PROMPTS, negative_prompt=NEGATIVE, **kw)
    err16 = max_diff(result.pixels, base)
    print(f"float16 file: as float32 {err32:.2e}, run in float16 {err16:.2e}")
    assert result.pixels.dtype == torch.float32 and result.latents.dtype == torch.float16
    assert err32 < 0.05 and err16 < 0.05


def test_a_random_diffusers_folder_matches_its_diffusers_pipeline(tmp_path):
    from checkpoints import diffusers_folder

    ours = load_pipeline(diffusers_folder(TINY), "cpu", torch.float32)
    ref = diffusers_pipeline(TINY)                    # the same seed, so the same weights
    ref.tokenizer.model_max_length = 77
    noise = unit_noise((2, 4, 8, 8), seed=3)
    expected = reference_run(ref, "dpmpp_2m", num_inference_steps=4, latents=noise)
    got = ours.generate(PROMPTS, negative_prompt=NEGATIVE, steps=4, sampler="dpmpp_2m", latents=noise, progress=False)
    assert_matches(got, expected, "diffusers folder, dpmpp_2m")


# -- defaults -----------------------------------------------------------------------------------

def test_defaults_come_from_checkpoint_metadata_else_sd15(ours, tmp_path):
    assert (ours.default_sampler, ours.default_steps) == ("pndm", 50)
    path = tmp_path / "with-defaults.safetensors"
    metadata = {"sdlearn_config": json.dumps(TINY.to_dict()), "sdlearn_defaults": json.dumps({"sampler": "ddim", "steps": 3})}
    save_file(load_file(original_file(TINY)), str(path), metadata=metadata)
    pipe = load_pipeline(path, "cpu", torch.float32)
    assert pipe.defaults == {"sampler": "ddim", "steps": 3}
    result = pipe.generate("a red circle", seed=0, progress=False)
    assert (result.settings["sampler"], result.settings["steps"], result.steps_done) == ("ddim", 3, 3)
    assert result.pixels.shape == (1, 3, 64, 64)                   # the native size
    with pytest.warns(UserWarning, match="unusable"):
        assert metadata_defaults({"sdlearn_defaults": '{"sampler": "plms", "steps": 20}'}) == {"steps": 20}


# -- callback and early stop ----------------------------------------------------------------------

def test_callback_sees_every_step_and_can_stop_early(ours):
    seen = []

    def watch(info):
        seen.append(info)
        assert info.latents.shape == info.x0_hat.shape == (2, 4, 8, 8)
        preview = info.preview()
        assert preview.shape == (2, 3, 8, 8)
        return info.step < 2                                # False after the third step

    result = ours.generate(PROMPTS, steps=6, sampler="ddim", seed=0, callback=watch, progress=False)
    assert [i.step for i in seen] == [0, 1, 2] and result.steps_done == 3 and result.stopped_early
    assert [i.timestep for i in seen] == [831, 665, 499]
    assert len(seen[0].preview_images()) == 2 and seen[0].preview_images()[0].size == (64, 64)
    expected = (ours.vae.decode(seen[-1].x0_hat / ours.vae.scaling_factor) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(result.pixels, expected, rtol=0, atol=1e-6)   # the last x̂₀, decoded

    def stop(info):
        if info.step == 1:
            raise StopGeneration
    result = ours.generate(PROMPTS, steps=6, sampler="euler", seed=0, callback=stop, progress=False)
    assert result.steps_done == 2 and result.stopped_early and len(result.images) == 2


def test_callback_on_the_last_step_is_not_an_early_stop(ours):
    full = ours.generate(PROMPTS[0], steps=3, sampler="ddim", seed=0, progress=False)
    stopped = ours.generate(PROMPTS[0], steps=3, sampler="ddim", seed=0, callback=lambda i: False, progress=False)
    assert stopped.steps_done == 1 and stopped.stopped_early
    last = ours.generate(PROMPTS[0], steps=3, sampler="ddim", seed=0, progress=False,
                         callback=lambda i: i.step < 2 or False)
    assert not last.stopped_early and torch.equal(last.pixels, full.pixels)


# -- attention maps ---------------------------------------------------------------------------------

def test_attention_maps_per_word_without_changing_the_image(ours):
    plain = ours.generate(PROMPTS, negative_prompt=NEGATIVE, steps=3, sampler="ddim", seed=0, progress=False)
    result = ours.generate(PROMPTS, negative_prompt=NEGATIVE, steps=3, sampler="ddim", seed=0, progress=False,
                           attention_maps=True)
    assert torch.equal(result.pixels, plain.pixels)
    first = result.attention_maps[0]
    assert first.words == ["a", "red", "circle", "on", "the", "left"]
    assert first.maps.shape == (6, 64, 64) and (first.maps >= 0).all()
    torch.testing.assert_close(first.tokens.sum(0), torch.ones(64, 64), rtol=0, atol=1e-4)
    assert result.attention_maps[1].words[-1] == "top"
    assert plain.attention_maps is None


def test_attention_maps_come_from_the_conditional_half(ours):
    """One DDIM step: the maps must be those of the UNet called on the prompt's context alone."""
    from sdlearn.attention_maps import CrossAttentionMaps

    noise = unit_noise((1, 4, 8, 8), seed=0)
    result = ours.generate(PROMPTS[0], negative_prompt=NEGATIVE, steps=1, sampler="ddim", latents=noise,
                           attention_maps=True, progress=False)
    with torch.inference_mode(), CrossAttentionMaps(latent_size=(8, 8)) as rec:
        ours.unet(noise, 1, ours.encode_prompts([PROMPTS[0]]))
    torch.testing.assert_close(result.attention_maps[0].tokens, rec.token_maps((64, 64))[0], rtol=1e-4, atol=1e-6)


# -- argument checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(steps=0), ValueError, r"steps=0 is out of range: expected 1 ≤ steps ≤ 1000"),
    (dict(steps=1001), ValueError, r"steps=1001 is out of range"),
    (dict(steps="20"), TypeError, r"steps must be an int"),
    (dict(guidance=-1.0), ValueError, r"guidance=-1.0 is out of range: expected a number ≥ 0"),
    (dict(guidance=float("nan")), ValueError, r"guidance=nan is out of range"),
    (dict(sampler="plms"), ValueError, r"unknown sampler 'plms'; expected one of ddpm, ddim, pndm, euler, euler_a, dpmpp_2m"),
    (dict(height=60), ValueError, r"height=60 is not a multiple of 8 .* use 56 or 64"),
    (dict(width=0), ValueError, r"width=0 is out of range"),
    (dict(latents=torch.zeros(2, 4, 8, 8)), ValueError, r"latents have shape \(2, 4, 8, 8\); expected \(1, 4, 8, 8\)"),
    (dict(latents=torch.zeros(1, 4, 8, 4), width=64), ValueError, r"latents have shape \(1, 4, 8, 4\); expected \(1, 4, 8, 8\)"),
    (dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.float64)), ValueError, r"pass latents.to\(torch.float32\)"),
    (dict(latents=[0.0]), TypeError, r"latents must be a torch.Tensor"),
    (dict(eta=0.5, sampler="euler"), ValueError, r"eta=0.5 applies to the ddim sampler only"),
    (dict(mask=Image.new("L", (64, 64))), ValueError, r"mask= needs image="),
    (dict(image=Image.new("RGB", (64, 64)), strength=1.5), ValueError, r"strength=1.5 is out of range: expected a number in \[0.0, 1.0\]"),
    (dict(image=Image.new("RGBA", (64, 64))), ValueError, r"mode 'RGBA'; expected an RGB picture: it has an alpha channel"),
    (dict(image=Image.new("L", (64, 64))), ValueError, r"mode 'L'; expected an RGB picture"),
    (dict(image=3), TypeError, r"image must be a PIL image, a tensor or a file path; got int"),
    (dict(image=torch.rand(3, 64, 64) * 2 - 1), ValueError, r"has values in \[-.*expected \[0, 1\]"),
    (dict(image=torch.rand(3, 32, 32), height=64, width=64), ValueError, r"image tensor is 32×32 .* expected 64×64"),
    (dict(image=Image.new("RGB", (64, 64)), mask=Image.new("RGBA", (64, 64))), ValueError, r"mask has PIL mode 'RGBA'"),
    (dict(image=Image.new("RGB", (64, 64)), mask=Image.new("L", (64, 48))), ValueError,
     r"mask is 64×48 but image is 64×64 \(W×H\)"),
    (dict(seed=1.5), TypeError, r"seed must be an int"),
    (dict(negative_prompt=["a", "b"]), ValueError, r"negative_prompt has 2 entries but there are 1 prompts"),
])
def test_bad_arguments_get_one_line_errors(ours, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        ours.generate("a red circle", progress=False, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("prompt, error, match", [
    (3, TypeError, "prompt must be a string or a list of strings; got int"),
    ([], ValueError, "prompt is an empty list"),
    (["ok", None], TypeError, r"prompt\[1\] is a NoneType"),
])
def test_prompt_must_be_text(ours, prompt, error, match):
    with pytest.raises(error, match=match):
        ours.generate(prompt, progress=False)


def test_too_large_a_size_is_refused_before_allocating(ours, monkeypatch):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"65536×65536 with batch 1 needs about .* GiB of cpu memory"):
        ours.generate("a red circle", height=65536, width=65536, progress=False)
    assert time.perf_counter() - start < 1.0
    import sdlearn.request
    monkeypatch.setattr(sdlearn.request, "free_memory_bytes", lambda device: 1000)
    with pytest.raises(ValueError, match="use a smaller size"):
        ours.generate("a red circle", progress=False)


def test_image_files_and_non_image_files(ours, picture, tmp_path):
    path = tmp_path / "in.png"
    picture.save(path)
    a = ours.generate(PROMPTS[0], steps=3, sampler="ddim", seed=0, image=path, progress=False)
    b = ours.generate(PROMPTS[0], steps=3, sampler="ddim", seed=0, image=picture, progress=False)
    assert torch.equal(a.pixels, b.pixels)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a picture")
    with pytest.raises(ValueError, match="junk.png: not a picture PIL can read"):
        ours.generate(PROMPTS[0], image=junk, progress=False)


def test_a_larger_image_sets_the_size_rounded_down(ours, picture):
    big = picture.resize((100, 75))
    result = ours.generate(PROMPTS[0], steps=2, sampler="ddim", seed=0, image=big, strength=1.0, progress=False)
    assert result.pixels.shape == (1, 3, 72, 96)


def test_result_type(ours):
    result = ours.generate(PROMPTS[0], steps=2, sampler="ddim", progress=False)
    assert isinstance(result, GenerationResult) and isinstance(result.seed, int)
    assert result.images[0].size == (64, 64) and result.latents.shape == (1, 4, 8, 8)


# -- SD v1.5 size ------------------------------------------------------------------------------------

def pipeline_from_diffusers(pipe) -> Pipeline:
    """Our modules sharing the tensors of a diffusers pipeline (same names; nothing copied)."""
    from sdlearn.schedule import NoiseSchedule
    from sdlearn.tokenizer import default_tokenizer
    from sdlearn.checkpoint import build_empty

    config = ModelConfig.sd15()
    state = {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict(),
             "text_encoder": transformers_state_dict(pipe.text_encoder)}
    models = {}
    for comp, sd in state.items():
        m = build_empty(comp, config)
        m.load_state_dict(sd, strict=True, assign=True)
        models[comp] = m.eval()
    return Pipeline(tokenizer=default_tokenizer(), schedule=NoiseSchedule.scaled_linear(), device=torch.device("cpu"),
                    dtype=torch.float32, config=config, source="diffusers (memory)", **models)


@pytest.fixture(scope="module")
def sd15_pair():
    torch.set_num_threads(THREADS)          # full size: every core helps
    ref = diffusers_pipeline(ModelConfig.sd15())
    ref.tokenizer.model_max_length = 77
    return pipeline_from_diffusers(ref), ref


@pytest.mark.full
@pytest.mark.parametrize("sampler", ["ddim", "pndm", "euler", "dpmpp_2m"])
def test_generate_matches_diffusers_at_sd15_size(sd15_pair, sampler):
    ours, ref = sd15_pair
    noise = unit_noise((1, 4, 32, 32), seed=0)
    expected = reference_run(ref, sampler, prompt=PROMPTS[:1], num_inference_steps=6, latents=noise,
                             height=256, width=256)
    got = ours.generate(PROMPTS[0], negative_prompt=NEGATIVE, steps=6, sampler=sampler, latents=noise, progress=False)
    assert_matches(got, expected, f"SD v1.5 size, {sampler}")
