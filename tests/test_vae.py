"""The VAE against diffusers' AutoencoderKL with the same random weights (and CompVis' attention)."""
import warnings

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from checkpoints import diffusers_vae_kwargs, ldm_vae_parts, original_file
from reference import randomize_, rel_err
from sdlearn.attention import AttentionRecorder
from sdlearn.configs import ModelConfig, VAEConfig
from sdlearn.vae import AutoencoderKL, DiagonalGaussian
from sdlearn.checkpoint import load_component, open_checkpoint

TOL = 1e-4


def make_pair(cfg: VAEConfig, seed: int = 0):
    """A diffusers VAE with every parameter randomised, and ours loaded from its state dict (strict)."""
    torch.manual_seed(seed)
    ref = randomize_(DiffusersVAE(**diffusers_vae_kwargs(cfg)), seed=seed).eval()
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


# A second small config that exercises what tiny() does not: every level a different width (in
# tiny() and SD v1.5 the two deepest levels are equally wide, so a wrong level index there goes
# unseen), three levels (f = 4), two ResBlocks per level.
THREE_WIDTHS = VAEConfig(block_out_channels=(16, 32, 48), layers_per_block=2, norm_num_groups=16, sample_size=32)


@pytest.fixture(scope="module")
def tiny():
    return make_pair(VAEConfig.tiny())


def images(b, h, w, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def check_parity(ours, ref, x):
    with torch.no_grad():
        got, want = ours.encode(x), ref.encode(x).latent_dist
        assert got.mean.shape == want.mean.shape
        assert rel_err(got.mean, want.mean) <= TOL
        assert rel_err(got.logvar, want.logvar) <= TOL
        z = want.mean + 0.5 * torch.randn(want.mean.shape, generator=torch.Generator().manual_seed(1))
        out, ref_out = ours.decode(z), ref.decode(z).sample
        assert out.shape == x.shape
        assert rel_err(out, ref_out) <= TOL
    return rel_err(got.mean, want.mean), rel_err(out, ref_out)


def test_state_dict_has_diffusers_names_and_shapes(tiny):
    ours, ref = tiny
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want


@pytest.mark.parametrize("h, w", [(64, 64), (48, 80)])
def test_vae_matches_diffusers_at_tiny_size(tiny, h, w):
    check_parity(*tiny, images(2, h, w))


def test_vae_matches_diffusers_when_every_level_has_its_own_width():
    ours, ref = make_pair(THREE_WIDTHS)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    check_parity(ours, ref, images(1, 24, 32))


@pytest.mark.full
@pytest.mark.parametrize("h, w", [(64, 64), (64, 96)])
def test_vae_matches_diffusers_at_sd15_size(h, w):
    ours, ref = make_pair(VAEConfig.sd15())
    enc_err, dec_err = check_parity(ours, ref, images(1, h, w))
    print(f"sd15 {h}x{w}: encode mean rel err {enc_err:.2e}, decode rel err {dec_err:.2e}")


def test_group_norm_eps_is_1e_6_like_the_reference(tiny):
    """Activations with variance near eps tell 1e-6 (the VAE's) from 1e-5 (the UNet's) apart."""
    ours, ref = tiny
    x = 1e-3 * torch.randn(1, ours.config.block_out_channels[-1], 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(ours.decoder.mid_block(x), ref.decoder.mid_block(x)) <= TOL


def test_sample_equals_diffusers_for_the_same_generator(tiny):
    ours, ref = tiny
    x = images(2, 32, 40)
    with torch.no_grad():
        got = ours.encode(x).sample(torch.Generator().manual_seed(7))
        want = ref.encode(x).latent_dist.sample(torch.Generator().manual_seed(7))
        mode = ours.encode(x).mode()
    assert rel_err(got, want) <= TOL
    assert rel_err(got, mode) > 1e-3          # the noise is really there
    again = ours.encode(x).sample(torch.Generator().manual_seed(7))
    assert torch.equal(got, again)


def test_forward_reconstructs_through_a_sample_like_diffusers(tiny):
    ours, ref = tiny
    x = images(1, 32, 32, seed=3)
    with torch.no_grad():
        got, posterior = ours(x, generator=torch.Generator().manual_seed(5))
        want = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(5)).sample
        got_mode, _ = ours(x, sample=False)
        want_mode = ref(x).sample
    assert isinstance(posterior, DiagonalGaussian)
    assert rel_err(got, want) <= TOL
    assert rel_err(got_mode, want_mode) <= TOL


def test_logvar_is_clamped_and_kl_matches_diffusers():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(2, 8, 3, 5, generator=g)
    moments[0, 4, 0, 0], moments[1, 5, 1, 1] = 50.0, -80.0      # log σ² far outside [-30, 20]
    ours, ref = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert ours.logvar[0, 0, 0, 0] == 20.0 and ours.logvar[1, 1, 1, 1] == -30.0
    for name in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=0, atol=0)
    assert ours.kl().shape == (2,)
    torch.testing.assert_close(ours.kl(), ref.kl(), rtol=1e-6, atol=0)
    # KL of N(0, I) from itself is zero, and positive otherwise.
    zero = DiagonalGaussian(torch.zeros(1, 8, 2, 2))
    assert zero.kl().item() == 0.0 and (ours.kl() > 0).all()


@pytest.mark.parametrize("h, w", [(64, 96), (72, 40), (8, 8), (24, 16)])
def test_round_trip_keeps_the_image_size(tiny, h, w):
    ours, _ = tiny
    x = images(1, h, w)
    with torch.no_grad():
        z = ours.encode(x).mode()
        assert z.shape == (1, 4, h // 8, w // 8)
        assert ours.decode(z).shape == (1, 3, h, w)


def test_bad_inputs_get_clear_errors(tiny):
    ours, _ = tiny
    with pytest.raises(ValueError, match=r"multiples of 8; got \(1, 3, 60, 64\)"):
        ours.encode(images(1, 60, 64))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\).*got \(1, 4, 64, 64\)"):
        ours.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"got \(3, 64, 64\)"):
        ours.encode(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"latents of shape \(B, 4, h, w\); got \(1, 3, 8, 8\)"):
        ours.decode(torch.zeros(1, 3, 8, 8))


def test_builds_on_meta_device_and_loads_with_assign(tiny):
    _, ref = tiny
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig.tiny())
    assert all(p.is_meta for p in model.parameters())
    assert list(model.buffers()) == []
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    assert not any(p.is_meta for p in model.parameters())
    x = images(1, 32, 32)
    with torch.no_grad():
        assert rel_err(model.encode(x).mean, ref.encode(x).latent_dist.mean) <= TOL


def test_attention_is_single_head_and_recordable(tiny):
    ours, _ = tiny
    with AttentionRecorder() as rec, torch.no_grad():
        z = ours.encode(images(1, 32, 48)).mode()
        ours.decode(z)
    assert sorted(rec.maps) == ["decoder.mid_block.attentions.0", "encoder.mid_block.attentions.0"]
    (probs,) = rec.maps["encoder.mid_block.attentions.0"]
    assert probs.shape == (1, 1, 4 * 6, 4 * 6)      # one head over the 4×6 pixels of the last level


def test_attention_equals_compvis_attnblock_with_its_1x1_conv_weights(tiny):
    """The original checkpoints store q, k, v, proj_out as [C, C, 1, 1] convs: dropping the two
    trailing 1s must give our linear layers exactly (this is what the key map in layouts.py does)."""
    from ldm.modules.diffusionmodules.model import AttnBlock

    ours = tiny[0].decoder.mid_block.attentions[0]
    c = ours.to_q.in_features
    block = randomize_(AttnBlock(c), seed=4).eval()
    rename = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    sd = {}
    for key, t in block.state_dict().items():
        module, param = key.rsplit(".", 1)
        sd[f"{rename[module]}.{param}"] = t.squeeze(-1).squeeze(-1) if t.ndim == 4 else t
    ours = type(ours)(c, tiny[0].config.norm_num_groups)
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, c, 5, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(ours(x), block(x)) <= TOL


def test_original_compvis_checkpoint_loads_and_matches_ldm():
    """A single file written from CompVis' own Encoder/Decoder (1×1-conv attention, `down`/`up`
    names), loaded through sdlearn.checkpoint, computes what the CompVis modules compute."""
    config = ModelConfig.tiny()
    path = original_file(config)
    vae = load_component(open_checkpoint(path), "vae")
    from safetensors.torch import load_file
    stored = load_file(str(path))
    parts = ldm_vae_parts(config.vae)
    for name, module in parts.items():
        prefix = f"first_stage_model.{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}, strict=True)
        module.eval()
    assert parts["decoder"].mid.attn_1.q.weight.shape[-2:] == (1, 1)
    x = images(1, 40, 56)
    with torch.no_grad():
        moments = parts["quant_conv"](parts["encoder"](x))
        posterior = vae.encode(x)
        assert rel_err(posterior.mean, moments[:, :4]) <= TOL
        assert rel_err(posterior.logvar, moments[:, 4:].clamp(-30, 20)) <= TOL
        z = posterior.mode()
        assert rel_err(vae.decode(z), parts["decoder"](parts["post_quant_conv"](z))) <= TOL


@pytest.mark.parametrize("tile", [None, 4])
def test_float16_decode_overflow_falls_back_to_float32(tiny, tile):
    _, ref = tiny
    model = AutoencoderKL(VAEConfig.tiny())
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    sd["decoder.conv_out.weight"] *= 1e5      # outputs around 1e5: inf in float16 (max 65504)
    sd["decoder.conv_out.bias"] *= 1e5
    model.load_state_dict(sd)
    side = 4 if tile is None else 10          # tiled: 4×4 windows every 3 latents
    want = model.decode(torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0)), tile=tile)
    assert want.abs().max() > 7e4

    model.half()
    z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0)).half()
    assert not torch.isfinite(model._decode(z)).all()        # the plain float16 decode overflows
    with pytest.warns(RuntimeWarning, match="decoding again in float32"):
        got = model.decode(z, tile=tile)
    assert torch.isfinite(got).all() and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-2                         # z was rounded to float16 on the way
    assert all(p.dtype == torch.float16 for p in model.parameters())   # the model stays float16


def test_float16_decode_without_overflow_stays_float16_and_quiet(tiny):
    _, ref = tiny
    model = AutoencoderKL(VAEConfig.tiny())
    model.load_state_dict(ref.state_dict())
    model.half()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model.decode(torch.randn(1, 4, 4, 4).half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# -- decoding in tiles ----------------------------------------------------------------------------

def _diffusers_tiled(ref, z, tile: int):
    """diffusers' own tiled decode (`enable_tiling()`), with tiles of `tile` latent pixels."""
    ref.enable_tiling()
    ref.tile_latent_min_size, ref.tile_sample_min_size = tile, tile * 8
    try:
        return ref.decode(z).sample
    finally:
        ref.disable_tiling()


@pytest.mark.parametrize("h, w, tile", [(16, 24, 8), (12, 12, 8), (20, 9, 4), (13, 30, 12)])
def test_tiled_decode_equals_diffusers_tiled_decode(tiny, h, w, tile):
    ours, ref = tiny
    z = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = ours.decode(z, tile=tile), _diffusers_tiled(ref, z, tile)
        whole = ours.decode(z)
    assert got.shape == want.shape == whole.shape == (2, 3, 8 * h, 8 * w)
    assert rel_err(got, want) <= 1e-5          # float rounding: each tile decode is (as whole decodes are)
    assert not torch.equal(got, whole)          # tiles really were decoded apart (GroupNorm sees one tile)


def test_tiling_is_a_no_op_when_one_tile_covers_the_latents(tiny):
    ours, _ = tiny
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(ours.decode(z, tile=8), ours.decode(z))
        ours.tile = 8                            # the attribute a pipeline sets: the same
        try:
            assert torch.equal(ours.decode(z), ours.decode(z, tile=None))
        finally:
            ours.tile = None


def test_tile_attribute_turns_tiling_on_for_every_decode(tiny):
    ours, ref = tiny
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = _diffusers_tiled(ref, z, 8)
        ours.tile = 8
        try:
            got = ours.decode(z)
        finally:
            ours.tile = None
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("tile", [0, 3, 6, -8, 2.5, "64", True])
def test_bad_tile_sizes_are_refused_clearly(tiny, tile):
    ours, _ = tiny
    with pytest.raises(ValueError, match="tile"):
        ours.decode(torch.zeros(1, 4, 16, 16), tile=tile)


def test_a_pipeline_decodes_in_tiles_when_its_vae_says_so():
    import sdlearn
    pipe = sdlearn.load_pipeline("tiny", "cpu", torch.float32)
    whole = pipe.generate("a red circle", height=128, width=96, steps=2, seed=1, progress=False)
    pipe.vae.tile = 8
    calls = []
    pipe.vae.decoder.register_forward_hook(lambda mod, args, out: calls.append(tuple(args[0].shape)))
    tiled = pipe.generate("a red circle", height=128, width=96, steps=2, seed=1, progress=False)
    assert tiled.pixels.shape == whole.pixels.shape == (1, 3, 128, 96)
    assert torch.equal(tiled.latents, whole.latents)             # only the decode changed
    assert len(calls) == 3 * 2 and max(s[-1] for s in calls) == 8  # 16×12 latents in 8×8 windows every 6
    assert torch.isfinite(tiled.pixels).all() and not torch.equal(tiled.pixels, whole.pixels)
