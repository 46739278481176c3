"""sdlearn's CLIP text encoder against transformers' CLIPTextModel with the same random weights."""
from __future__ import annotations

import pytest
import torch

from reference import randomize_, rel_err
from sdlearn.attention import AttentionRecorder
from sdlearn.clip import CLIPTextModel
from sdlearn.configs import CLIPTextConfig
from sdlearn.tokenizer import default_tokenizer

transformers = pytest.importorskip("transformers")

PROMPTS = ["a photograph of an astronaut riding a horse", "a small red circle on the left", ""]


def reference_model(cfg: CLIPTextConfig, seed: int = 0) -> torch.nn.Module:
    """transformers' CLIPTextModel of this size, every parameter random, eager attention
    (an explicit mask added to the scores: a different path from sdlearn's SDPA)."""
    hf_cfg = transformers.CLIPTextConfig(**cfg.to_dict(), hidden_act="quick_gelu", attn_implementation="eager")
    return randomize_(transformers.CLIPTextModel(hf_cfg), seed=seed).eval()


def transformers_state_dict(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Its state dict under the checkpoint names: transformers 5 drops the `text_model.` prefix that
    SD checkpoints (and transformers 4) use, and some versions or files carry `position_ids`."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in ref.state_dict().items() if not k.endswith("position_ids")}


def sample_ids(cfg: CLIPTextConfig, batch: int = 4, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.max_position_embeddings),
                        generator=torch.Generator().manual_seed(seed))
    return torch.cat([default_tokenizer()(PROMPTS), ids])


def check_parity(cfg: CLIPTextConfig) -> float:
    ref = reference_model(cfg)
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict(transformers_state_dict(ref), strict=True)
    ids = sample_ids(cfg)
    with torch.no_grad():
        want = ref(input_ids=ids).last_hidden_state
        got = ours(ids)
    assert got.shape == want.shape == (len(ids), 77, cfg.hidden_size)
    return rel_err(got, want)


def test_text_encoder_matches_transformers_at_tiny_size():
    assert check_parity(CLIPTextConfig.tiny()) <= 1e-5


@pytest.mark.full
def test_text_encoder_matches_transformers_at_sd15_size():
    assert check_parity(CLIPTextConfig.sd15()) <= 1e-5


@pytest.fixture(scope="module")
def tiny():
    cfg = CLIPTextConfig.tiny()
    ref = reference_model(cfg, seed=1)
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict(transformers_state_dict(ref), strict=True)
    return cfg, ref, ours


def test_parameter_names_are_transformers_and_there_are_no_buffers(tiny):
    cfg, ref, ours = tiny
    assert set(ours.state_dict()) == set(transformers_state_dict(ref))
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in ours.state_dict()
    assert list(ours.buffers()) == []


def test_sd15_size_has_123m_parameters():
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig.sd15())
    assert sum(p.numel() for p in model.parameters()) == 123_060_480


def test_builds_on_meta_device_and_loads_with_assign(tiny):
    cfg, ref, ours = tiny
    with torch.device("meta"):
        empty = CLIPTextModel(cfg)
    assert all(p.is_meta for p in empty.parameters())
    empty.load_state_dict(transformers_state_dict(ref), strict=True, assign=True)
    ids = sample_ids(cfg, batch=1)
    with torch.no_grad():
        assert torch.equal(empty.eval()(ids), ours(ids))


def test_runs_on_the_meta_device_for_shapes_alone():
    """Built on the meta device (no weights), the encoder still gives the output shape: the id
    check, which would have to read the ids, is skipped for meta tensors."""
    cfg = CLIPTextConfig.sd15()
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    out = model(torch.zeros(2, 77, dtype=torch.long, device="meta"))
    assert out.is_meta and out.shape == (2, 77, cfg.hidden_size)


def test_attention_is_causal(tiny):
    cfg, _, ours = tiny
    ids = sample_ids(cfg, batch=2)
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = ours(ids), ours(changed)
    assert torch.equal(a[:, :10], b[:, :10])              # earlier tokens cannot see token 10
    assert (a[:, 10:] - b[:, 10:]).abs().amax(dim=-1).min() > 1e-4   # every later one does


def test_shorter_ids_give_the_prefix_of_the_full_output(tiny):
    cfg, ref, ours = tiny
    ids = sample_ids(cfg, batch=2)
    with torch.no_grad():
        for n in (20, 1):                                  # down to the start token alone
            short = ours(ids[:, :n])
            assert short.shape == (len(ids), n, cfg.hidden_size)
            assert rel_err(short, ref(input_ids=ids[:, :n]).last_hidden_state) <= 1e-5
            assert rel_err(short, ours(ids)[:, :n]) <= 1e-6


def test_attention_maps_are_recorded_per_layer_and_are_lower_triangular(tiny):
    cfg, _, ours = tiny
    ids = sample_ids(cfg, batch=1)
    with AttentionRecorder() as rec, torch.no_grad():
        ours(ids)
    tags = [f"text_model.encoder.layers.{i}.self_attn" for i in range(cfg.num_hidden_layers)]
    assert sorted(rec.maps) == tags
    probs = rec.maps[tags[0]][0]
    assert probs.shape == (len(ids), cfg.num_attention_heads, 77, 77)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    assert probs.triu(1).abs().max() == 0


def test_wrong_ids_are_refused_with_what_was_expected(tiny):
    cfg, _, ours = tiny
    ids = sample_ids(cfg, batch=1)
    with pytest.raises(TypeError, match="integer token ids"):
        ours(ids.float())
    with pytest.raises(TypeError, match="LongTensor"):
        ours(ids.tolist())
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        ours(ids[0])
    with pytest.raises(ValueError, match="1 ≤ L ≤ 77"):
        ours(torch.cat([ids, ids], dim=1))
    with pytest.raises(ValueError, match=r"1 ≤ L ≤ 77; got \(1, 0\)"):
        ours(ids[:1, :0])
    one_bad = ids.clone()
    one_bad[0, 5] = 49413                                  # among valid ids: the message names this one
    with pytest.raises(ValueError, match="found 49413"):
        ours(one_bad)
    with pytest.raises(ValueError, match="49408"):
        ours(torch.full((1, 77), 49408))
    with pytest.raises(ValueError, match="found -1"):
        ours(torch.full((1, 77), -1))
    with torch.no_grad():
        assert torch.equal(ours(ids.int()), ours(ids))


def test_attention_mask_hides_tokens_as_transformers_does(tiny):
    """compel's down-weighting encodes prompts with some tokens masked (attention_mask 0): they are
    hidden from every later token, on top of the causal mask; the recorded maps agree."""
    cfg, ref, ours = tiny
    ids = sample_ids(cfg, batch=1)[:2]
    mask = torch.ones_like(ids)
    mask[0, 3:5] = 0
    mask[1, 2] = 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        with AttentionRecorder(lambda tag: tag.endswith("layers.0.self_attn")) as rec:
            got = ours(ids, mask)
        assert rel_err(got, want) <= 1e-5
        assert rel_err(got, ours(ids)) > 1e-3
        assert rel_err(ours(ids, torch.ones_like(ids)), ours(ids)) <= 1e-6
    probs = rec.maps["text_model.encoder.layers.0.self_attn"][0]         # (B, heads, 77, 77)
    assert probs[0, :, 5:, 3:5].abs().max() == 0 and probs[1, :, 3:, 2].abs().max() == 0
    assert torch.allclose(probs.sum(-1), torch.ones(()))
    with pytest.raises(ValueError, match="attention_mask"):
        ours(ids, mask[:, :10])
