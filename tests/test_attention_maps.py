"""Per-word cross-attention maps: the aggregation by hand, and word alignment."""
import pytest
import torch
import torch.nn.functional as F

from reference import randomize_
from sdlearn.attention import attention
from sdlearn.attention_maps import CrossAttentionMaps, word_maps, word_tokens
from sdlearn.configs import UNetConfig
from sdlearn.tokenizer import default_tokenizer
from sdlearn.unet import UNet


def probs(b, heads, nq, nk=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, heads, nq, nk, generator=g).softmax(-1)


def test_aggregation_equals_the_mean_of_upsampled_head_maps():
    """Two layers at 4×6 and 2×3 latent pixels, two 'steps': by hand, every (head, call) map is
    upsampled to 16×24 and the mean taken."""
    rec = CrossAttentionMaps(rows=slice(2, 4), latent_size=(4, 6))
    calls = [probs(4, 3, 24, seed=1), probs(4, 3, 6, seed=2), probs(4, 3, 24, seed=3), probs(4, 3, 6, seed=4)]
    shapes = [(4, 6), (2, 3), (4, 6), (2, 3)]
    for p in calls:
        rec.add("down_blocks.0.attentions.0.transformer_blocks.0.attn2", p)
    got = rec.token_maps((16, 24))

    maps = []
    for p, (h, w) in zip(calls, shapes):
        for head in range(3):
            m = p[2:4, head].transpose(1, 2).reshape(2, 77, h, w)      # (b, tokens, h, w)
            maps.append(F.interpolate(m, size=(16, 24), mode="bilinear", align_corners=False))
    expected = torch.stack(maps).mean(0)
    assert got.shape == (2, 77, 16, 24)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert rec.count == 12 and rec.calls == 4


def test_maps_are_nonnegative_and_sum_to_one_over_tokens():
    rec = CrossAttentionMaps(latent_size=(8, 8))
    for seed in range(3):
        rec.add("mid_block.attentions.0.transformer_blocks.0.attn2", probs(1, 2, 16, seed=seed))
        rec.add("up_blocks.1.attentions.0.transformer_blocks.0.attn2", probs(1, 2, 64, seed=seed + 9))
    maps = rec.token_maps((64, 64))
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(1), torch.ones(1, 64, 64), rtol=0, atol=1e-5)


def test_only_cross_attention_layers_are_recorded_through_the_unet():
    cfg = UNetConfig.tiny()
    unet = randomize_(UNet(cfg), seed=0).eval()
    latents = torch.randn(2, 4, 8, 12)
    context = torch.randn(2, 77, cfg.cross_attention_dim)
    rec = CrossAttentionMaps(latent_size=(8, 12))
    with torch.no_grad(), rec:
        unet(latents, 500, context)
        # a self-attention call with a tag is ignored (attn1)
        attention(torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8), 2, tag="x.attn1")
    n_attn2 = sum(1 for name, _ in unet.named_modules() if name.endswith("attn2"))
    assert rec.calls == n_attn2 > 0
    assert set(rec.sums) == {(8, 12), (4, 6)}                         # the tiny UNet's two levels
    assert rec.token_maps((64, 96)).shape == (2, 77, 64, 96)


def test_unfoldable_query_count_is_explained():
    rec = CrossAttentionMaps(latent_size=(8, 8))
    with pytest.raises(ValueError, match="query pixels"):
        rec.add("a.attn2", probs(1, 1, 10))
    with pytest.raises(RuntimeError, match="no cross-attention"):
        CrossAttentionMaps().token_maps((8, 8))


def test_words_merge_their_bpe_pieces():
    tok = default_tokenizer()
    prompt = "A photograph of sdlearnish, astronauts"
    words, index = word_tokens(tok, prompt)
    assert words == ["a", "photograph", "of", "sdlearnish", ",", "astronauts"]
    ids = tok.encode(prompt)
    flat = [k for span in index for k in span]
    assert flat == list(range(1, len(ids) - 1))                       # every id, in order, once
    assert len(index[3]) > 1                                          # an invented word: several pieces
    assert tok.decode([ids[k] for k in index[3]]).replace(" ", "") == "sdlearnish"


def test_word_map_is_the_sum_of_its_token_maps():
    tok = default_tokenizer()
    prompt = "a red sdlearnish circle"
    token_maps = torch.rand(77, 5, 7, generator=torch.Generator().manual_seed(0))
    wm = word_maps(tok, prompt, token_maps)
    assert wm.words == ["a", "red", "sdlearnish", "circle"]
    assert wm.maps.shape == (4, 5, 7)
    span = wm.token_index[2]
    torch.testing.assert_close(wm["sdlearnish"], token_maps[span].sum(0))
    torch.testing.assert_close(wm[0], token_maps[1])
    with pytest.raises(KeyError, match="words are"):
        wm["blue"]


def test_words_past_the_77_token_limit_are_dropped():
    tok = default_tokenizer()
    prompt = " ".join(["red"] * 80)
    words, index = word_tokens(tok, prompt)
    assert len(words) == 75 and index[-1] == [75]
