"""The UNet against diffusers' `UNet2DConditionModel` with the same random weights, plus the
attention-capture hook, meta-device construction and input checks."""
from __future__ import annotations

import functools
import math

import pytest
import torch

from checkpoints import diffusers_unet_kwargs
from reference import randomize_, rel_err
from sdlearn.attention import AttentionRecorder
from sdlearn.configs import UNetConfig
from sdlearn.unet import UNet, timestep_embedding

TOL = 1e-4

# A second small config that exercises what tiny() does not: three levels, a level without
# attention in the middle, two ResBlocks per level (three on the way up), two transformer blocks.
THREE_LEVELS = UNetConfig(block_out_channels=(32, 64, 96), attention_levels=(True, False, True), layers_per_block=2,
                          num_heads=4, cross_attention_dim=48, transformer_layers_per_block=2, norm_num_groups=16,
                          sample_size=16)


@functools.lru_cache(maxsize=2)
def models(cfg: UNetConfig, seed: int = 0):
    """(ours, diffusers') with the same randomised weights, in eval mode."""
    from diffusers import UNet2DConditionModel
    ref = randomize_(UNet2DConditionModel(**diffusers_unet_kwargs(cfg)), seed).eval()
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def inputs(cfg: UNetConfig, batch: int, h: int, w: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    context = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    return latents, context


@torch.no_grad()
def assert_matches_diffusers(cfg, batch, h, w, timesteps, seed=1):
    ours, ref = models(cfg)
    latents, context = inputs(cfg, batch, h, w, seed)
    want = ref(latents, timesteps, context).sample
    got = ours(latents, timesteps, context)
    assert got.shape == want.shape == latents.shape
    err = rel_err(got, want)
    assert err <= TOL, f"relative error {err:.2e} > {TOL:g}"
    return got


# --- the pieces -----------------------------------------------------------------------------

def test_timestep_embedding_is_cos_first_and_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0, 1, 10, 500, 999])
    emb = timestep_embedding(t, 320)
    assert emb.shape == (5, 320)
    torch.testing.assert_close(emb, get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0),
                               rtol=0, atol=1e-6)
    # cos first: at t = 0 the first half is cos(0) = 1, the second half sin(0) = 0.
    assert torch.equal(emb[0, :160], torch.ones(160)) and torch.equal(emb[0, 160:], torch.zeros(160))
    # ω_1 = 10000^(-1/160): the second column is cos(t·ω_1).
    assert emb[3, 1].item() == pytest.approx(math.cos(500 * 10000 ** (-1 / 160)), abs=1e-5)
    # odd sizes pad a zero column, as diffusers does
    torch.testing.assert_close(timestep_embedding(t, 7), get_timestep_embedding(t, 7, True, 0), rtol=0, atol=1e-6)


def test_sd15_has_the_reference_parameter_count_and_no_buffers():
    with torch.device("meta"):
        unet = UNet(UNetConfig.sd15())
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert list(unet.buffers()) == []
    assert len(unet.state_dict()) == 686      # as many tensors as model.diffusion_model.* in the checkpoint


@pytest.mark.parametrize("cfg", [UNetConfig.tiny(), THREE_LEVELS, UNetConfig.sd15()], ids=["tiny", "3levels", "sd15"])
def test_state_dict_keys_and_shapes_equal_diffusers(cfg):
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        ref = UNet2DConditionModel(**diffusers_unet_kwargs(cfg))
        ours = UNet(cfg)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want


def test_meta_construction_then_assign_loads_real_weights():
    cfg = UNetConfig.tiny()
    ours, ref = models(cfg)
    with torch.device("meta"):
        unet = UNet(cfg)
    assert all(p.is_meta for p in unet.parameters())
    unet.load_state_dict(ref.state_dict(), strict=True, assign=True)
    assert not any(p.is_meta for p in unet.parameters())
    latents, context = inputs(cfg, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(unet(latents, 10, context), ours(latents, 10, context))


# --- parity with diffusers --------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [UNetConfig.tiny(), THREE_LEVELS], ids=["tiny", "3levels"])
@pytest.mark.parametrize("batch, timesteps", [(1, 1), (1, 999), (2, 500), (2, "per-sample")])
def test_unet_matches_diffusers_at_small_sizes(cfg, batch, timesteps):
    if timesteps == "per-sample":
        timesteps = torch.tensor([999, 3])
    assert_matches_diffusers(cfg, batch, 16, 16, timesteps)


@pytest.mark.parametrize("cfg", [UNetConfig.tiny(), THREE_LEVELS], ids=["tiny", "3levels"])
def test_unet_matches_diffusers_on_non_square_latents(cfg):
    assert_matches_diffusers(cfg, 2, 8, 24, torch.tensor(250))
    assert_matches_diffusers(cfg, 1, 20, 12, 0.5 * 999)   # fractional timestep, as Euler samplers pass


@pytest.mark.parametrize("cfg", [UNetConfig.tiny(), THREE_LEVELS], ids=["tiny", "3levels"])
@pytest.mark.parametrize("h, w", [(9, 13), (8, 12), (5, 3), (1, 1)])
def test_unet_matches_diffusers_at_any_latent_size(cfg, h, w):
    """Sides that are not multiples of 2^(levels−1): the stride-2 convs round odd sides up and the
    upsamplers return to each skip's size (diffusers' `upsample_size`). 8×12 is even at the first
    halving but odd (3) at the second in the 3-level config."""
    assert_matches_diffusers(cfg, 2, h, w, torch.tensor([981, 1]))


def test_odd_latents_round_up_on_the_way_down_and_back_on_the_way_up():
    cfg = THREE_LEVELS
    ours, _ = models(cfg)
    latents, context = inputs(cfg, 1, 9, 13)
    table = {name: (i, o) for name, i, o in ours.trace_shapes(latents, 5, context)}
    assert table["down_blocks.0.downsamplers.0"][1][2:] == (5, 7)
    assert table["down_blocks.1.downsamplers.0"][1][2:] == (3, 4)
    assert table["up_blocks.0.upsamplers.0"][1][2:] == (5, 7)       # not (6, 8): the skip's size
    assert table["up_blocks.1.upsamplers.0"][1][2:] == (9, 13)
    assert table["conv_out"][1] == (1, 4, 9, 13)


@pytest.mark.parametrize("cfg, factor", [(UNetConfig.tiny(), 2), (THREE_LEVELS, 4)])
def test_downsample_factor_is_how_much_smaller_the_mid_block_maps_are(cfg, factor):
    ours, _ = models(cfg)
    latents, context = inputs(cfg, 1, 16, 24)
    table = {name: (i, o) for name, i, o in ours.trace_shapes(latents, 5, context)}
    assert ours.downsample_factor == factor
    assert table["mid_block.resnets.0"][0][2:] == (16 // factor, 24 // factor)


def test_timestep_forms_agree():
    cfg = UNetConfig.tiny()
    ours, _ = models(cfg)
    latents, context = inputs(cfg, 2, 8, 8)
    with torch.no_grad():
        outs = [ours(latents, t, context) for t in (700, torch.tensor(700), torch.tensor([700]), torch.tensor([700, 700]))]
        other = ours(latents, torch.tensor([700, 100]), context)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    # per-sample timesteps: sample 0 still sees t = 700, sample 1 sees t = 100
    torch.testing.assert_close(other[0], outs[0][0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other[1], outs[0][1], atol=1e-3)


@pytest.mark.full
@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 48, 80)], ids=["64x64", "48x80"])
def test_unet_matches_diffusers_at_sd15_size(shape):
    batch, h, w = shape
    assert_matches_diffusers(UNetConfig.sd15(), batch, h, w, torch.tensor([981, 1])[:batch])


# --- attention capture -----------------------------------------------------------------------

def test_attention_capture_is_bit_identical_and_maps_are_distributions():
    cfg = THREE_LEVELS
    ours, _ = models(cfg)
    latents, context = inputs(cfg, 2, 16, 8)
    with torch.no_grad():
        plain = ours(latents, 400, context)
        with AttentionRecorder(lambda tag: tag.endswith("attn2")) as rec:
            recorded = ours(latents, 400, context)
            ours(latents, 300, context)
    assert torch.equal(plain, recorded)

    cross = [n for n, m in ours.named_modules() if n.endswith("attn2")]
    # levels 0 and 2 have attention: down 2 + 2, mid 1, up 3 + 3 transformers, each 2 blocks deep
    assert len(cross) == (2 + 2 + 1 + 3 + 3) * 2
    assert sorted(rec.maps) == sorted(cross)
    for tag, maps in rec.maps.items():
        assert len(maps) == 2, tag                                   # one map per call
        for probs in maps:
            b, heads, pixels, tokens = probs.shape
            assert (b, heads, tokens) == (2, cfg.num_heads, 77)
            assert pixels in (16 * 8, 4 * 2), (tag, probs.shape)     # level 0 or level 2
            torch.testing.assert_close(probs.sum(-1), torch.ones(b, heads, pixels))
    assert rec.maps["down_blocks.0.attentions.0.transformer_blocks.0.attn2"][0].shape[2] == 16 * 8
    assert rec.maps["mid_block.attentions.0.transformer_blocks.1.attn2"][0].shape[2] == 4 * 2
    # The two calls used different timesteps, so their maps differ.
    a, b = rec.maps["up_blocks.2.attentions.2.transformer_blocks.0.attn2"]
    assert not torch.equal(a, b)


def test_no_attention_maps_are_computed_without_a_recorder(monkeypatch):
    import sdlearn.attention as attention_module

    def fail(*args, **kwargs):
        raise AssertionError("attention probabilities computed with no recorder active")
    monkeypatch.setattr(attention_module, "attention_probs", fail)
    cfg = UNetConfig.tiny()
    ours, _ = models(cfg)
    latents, context = inputs(cfg, 1, 8, 8)
    with torch.no_grad():
        ours(latents, 10, context)                   # the off path never builds a probability matrix
        with pytest.raises(AssertionError, match="no recorder active"), AttentionRecorder():
            ours(latents, 10, context)               # ... and the on path does (so the check can fail)


def test_attention_layers_are_tagged_with_their_qualified_names():
    unet = UNet(UNetConfig.tiny())
    tags = {n: m.tag for n, m in unet.named_modules() if hasattr(m, "tag")}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2" in tags
    assert all(name == tag for name, tag in tags.items())
    assert sum(n.endswith("attn1") for n in tags) == sum(n.endswith("attn2") for n in tags) == 1 + 1 + 1 + 2 + 2   # tiny: one ResBlock per level down, two up


# --- shapes and errors -----------------------------------------------------------------------

def test_trace_shapes_lists_every_block_in_order():
    cfg = UNetConfig.tiny()
    ours, _ = models(cfg)
    latents, context = inputs(cfg, 1, 16, 24)
    rows = ours.trace_shapes(latents, 5, context)
    names = [r[0] for r in rows]
    assert names[0] == "conv_in" and names[-1] == "conv_out"
    assert names.index("down_blocks.0.downsamplers.0") < names.index("mid_block.resnets.0") < names.index("up_blocks.0.resnets.0")
    table = {name: (i, o) for name, i, o in rows}
    assert table["conv_in"] == ((1, 4, 16, 24), (1, 64, 16, 24))
    assert table["down_blocks.0.downsamplers.0"] == ((1, 64, 16, 24), (1, 64, 8, 12))
    assert table["up_blocks.0.resnets.0"] == ((1, 128 + 128, 8, 12), (1, 128, 8, 12))   # skip concatenated
    assert table["up_blocks.1.resnets.1"] == ((1, 64 + 64, 16, 24), (1, 64, 16, 24))
    assert table["conv_out"] == ((1, 64, 16, 24), (1, 4, 16, 24))
    # one row per ResBlock, transformer, sampler, plus conv_in, conv_norm_out, conv_out
    assert len(rows) == (1 + 1 + 1) + (1 + 1) + 3 + (2 + 2 + 1) + (2 + 2) + 3


def test_wrong_inputs_give_clear_errors():
    cfg = THREE_LEVELS
    unet = UNet(cfg)
    latents, context = inputs(cfg, 2, 16, 16)
    with pytest.raises(ValueError, match=r"H and W of at least 1; got 16×0"):
        unet(latents[..., :0], 1, context)
    with pytest.raises(ValueError, match=r"context of shape \(2, tokens, 48\).*got \(2, 77, 768\)"):
        unet(latents, 1, torch.zeros(2, 77, 768))
    with pytest.raises(ValueError, match=r"context of shape \(2, tokens, 48\).*got \(1, 77, 48\)"):
        unet(latents, 1, context[:1])
    with pytest.raises(ValueError, match=r"latents of shape \(B, 4, H, W\).*got \(2, 3, 16, 16\)"):
        unet(latents[:, :3], 1, context)
    with pytest.raises(ValueError, match=r"timesteps .* \(2,\); got \(3,\)"):
        unet(latents, torch.tensor([1, 2, 3]), context)
    with pytest.raises(ValueError, match=r"context of shape \(2, tokens, 48\).*got \(2, 77, 48, 1\)"):
        unet(latents, 1, context[..., None])                              # one dimension too many
    with pytest.raises(ValueError, match=r"context of shape \(2, tokens, 48\).*got \(3, 77, 48\)"):
        unet(latents, 1, torch.cat([context, context[:1]]))              # more prompts than latents
    with pytest.raises(ValueError, match=r"context of shape \(2, tokens, 48\).*got \(2, 77, 40\)"):
        unet(latents, 1, context[..., :40])                              # narrower than cross_attention_dim
    with pytest.raises(ValueError, match=r"timesteps .* \(2,\); got \(2, 1\)"):
        unet(latents, torch.tensor([[1], [2]]), context)
