"""Spherical interpolation of starting noise and of text conditioning (sdlearn.interpolation)."""
from __future__ import annotations

import math

import pytest
import torch

import sdlearn
from sdlearn.interpolation import lerp, norm_ratio, path, seed_noise, slerp


def shoemake(a, b, t):
    """Shoemake's formula written out on flat float64 vectors, as an independent reference."""
    a, b = a.double().flatten(), b.double().flatten()
    theta = math.acos((a @ b / (a.norm() * b.norm())).item())
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def test_slerp_matches_the_formula_and_its_ends():
    a, b = seed_noise(0, (1, 4, 8, 8)), seed_noise(1, (1, 4, 8, 8))
    for t in (0.0, 0.1, 0.5, 0.77, 1.0):
        got = slerp(a, b, t)
        assert got.shape == a.shape and got.dtype == a.dtype
        assert torch.allclose(got.double().flatten(), shoemake(a, b, t), atol=1e-6)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)


def test_slerp_keeps_the_norm_and_moves_the_angle_linearly():
    a = seed_noise(0, (1, 4, 64, 64))
    b = seed_noise(1, (1, 4, 64, 64))
    b = b * (a.norm() / b.norm())                   # equal norms: every point keeps it exactly
    theta = math.acos((a.flatten() @ b.flatten() / a.norm() ** 2).item())
    for t in (0.25, 0.5, 0.75):
        x = slerp(a, b, t)
        assert x.norm().item() == pytest.approx(a.norm().item(), rel=1e-5)
        angle = math.acos(min(1.0, (x.flatten().double() @ a.flatten().double() / (x.norm() * a.norm())).item()))
        assert angle == pytest.approx(t * theta, rel=1e-4)


def test_lerp_of_independent_noise_shrinks_the_norm_by_sqrt_half():
    a, b = seed_noise(0, (1, 4, 64, 64)), seed_noise(1, (1, 4, 64, 64))
    assert norm_ratio(a) == pytest.approx(1.0, abs=0.02)
    assert norm_ratio(lerp(a, b, 0.5)) == pytest.approx(math.sqrt(0.5), abs=0.02)
    assert norm_ratio(slerp(a, b, 0.5)) == pytest.approx(1.0, abs=0.02)


def test_slerp_per_token_and_nearly_parallel_vectors():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 77, 16, generator=g), torch.randn(2, 77, 16, generator=g)
    got = slerp(a, b, 0.3, dim=-1)
    for i, j in [(0, 0), (1, 40), (0, 76)]:
        assert torch.allclose(got[i, j].double(), shoemake(a[i, j], b[i, j], 0.3), atol=1e-6)
    # identical or nearly identical vectors: the formula is 0/0, lerp is the same curve
    assert torch.allclose(slerp(a, a, 0.4), a, atol=1e-6)
    c = a + 1e-6 * b
    assert torch.isfinite(slerp(a, c, 0.5)).all()
    assert torch.allclose(slerp(a, c, 0.5), lerp(a, c, 0.5), atol=1e-6)


def test_path_and_bad_input():
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    frames = path(a, b, 5)
    assert len(frames) == 5 and torch.allclose(frames[0], a, atol=1e-6) and torch.allclose(frames[-1], b, atol=1e-6)
    assert torch.allclose(path(a, b, 3, kind="lerp")[1], (a + b) / 2)
    with pytest.raises(ValueError, match="same shape"):
        slerp(a, torch.randn(5, 3), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        slerp(a, b, 1.5)
    with pytest.raises(ValueError, match="at least 2"):
        path(a, b, 1)
    with pytest.raises(ValueError, match="'slerp' or 'lerp'"):
        path(a, b, 3, kind="cubic")


def test_seed_noise_is_what_generate_starts_from():
    pipe = sdlearn.load_pipeline("tiny")
    shape = (1, 4, 8, 8)
    a = pipe.generate("a red circle on the left", seed=5, steps=4, progress=False)
    b = pipe.generate("a red circle on the left", latents=seed_noise(5, shape), steps=4, progress=False)
    assert torch.equal(a.latents, b.latents)     # the same numbers from the same generator: equal by construction


def test_prompt_embeds_give_the_prompts_picture_and_interpolate():
    pipe = sdlearn.load_pipeline("tiny")
    a, b = "a red circle on the left", "a blue square on the right"
    by_text = pipe.generate([a, b], seed=2, steps=6, progress=False)
    cond = pipe.encode_prompts([a, b])
    by_embeds = pipe.generate(prompt_embeds=cond, seed=2, steps=6, progress=False)
    assert torch.allclose(by_embeds.latents, by_text.latents, atol=1e-5)
    assert by_embeds.settings["prompt_embeds"] and not by_text.settings["prompt_embeds"]
    # an explicit negative conditioning equals the encoded negative prompt
    neg = pipe.encode_prompts([""])
    with_neg = pipe.generate(prompt_embeds=cond, negative_prompt_embeds=neg, seed=2, steps=6, progress=False)
    assert torch.allclose(with_neg.latents, by_text.latents, atol=1e-5)
    # per-token slerp half way: a conditioning of the same shape, between the two pictures
    mid = slerp(cond[:1], cond[1:], 0.5, dim=-1)
    assert mid.shape == (1, 77, pipe.text_encoder.config.hidden_size)
    out = pipe.generate(prompt_embeds=mid, seed=2, steps=6, num_images=2, progress=False)
    assert out.latents.shape == (2, 4, 8, 8) and torch.isfinite(out.latents).all()


def test_prompt_embeds_bad_input():
    pipe = sdlearn.load_pipeline("tiny")
    cond = pipe.encode_prompts(["a red circle"])
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        pipe.generate("a red circle", prompt_embeds=cond, progress=False)
    with pytest.raises(ValueError, match=r"\(B, tokens, 64\)"):
        pipe.generate(prompt_embeds=torch.zeros(1, 77, 768), progress=False)
    with pytest.raises(ValueError, match="one row or one per prompt"):
        pipe.generate(prompt_embeds=cond.repeat(3, 1, 1), negative_prompt_embeds=cond.repeat(2, 1, 1), progress=False)


def test_prompt_embeds_more_bad_input():
    pipe = sdlearn.load_pipeline("tiny")
    with pytest.raises(ValueError, match="needs prompt_embeds too"):
        pipe.generate("a red circle", negative_prompt_embeds=torch.zeros(1, 77, 64), progress=False)
    with pytest.raises(ValueError, match="torch.int64"):
        pipe.generate(prompt_embeds=torch.zeros(1, 77, 64, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="10 tokens"):
        pipe.generate(prompt_embeds=torch.zeros(1, 10, 64), progress=False)


def test_attention_maps_need_a_plain_prompt():
    pipe = sdlearn.load_pipeline("tiny")
    with pytest.raises(ValueError, match="without prompt_syntax and without prompt_embeds"):
        pipe.generate(prompt_embeds=pipe.encode_prompts(["a red circle"]), attention_maps=True, progress=False)
