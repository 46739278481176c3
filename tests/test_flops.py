"""sdlearn.flops: a UNet call's FLOPs by kind of block sum to the whole call, and two kinds match
their formulas written out by hand."""
from __future__ import annotations

import pytest

from sdlearn.configs import UNetConfig
from sdlearn.flops import KINDS, block_kind, own_flops, unet_flops_by_block
from sdlearn.unet import flops_per_call


@pytest.mark.parametrize("config", [UNetConfig.tiny(), UNetConfig.sd15()], ids=["tiny", "sd15"])
def test_the_kinds_sum_to_the_whole_call(config):
    by_kind = unet_flops_by_block(config)
    assert tuple(by_kind) == KINDS
    assert sum(by_kind.values()) == flops_per_call(config)
    assert all(v >= 0 for v in by_kind.values())
    assert by_kind[KINDS[0]] > 0 and by_kind[KINDS[5]] > 0


def test_sd15_feed_forward_and_self_attention_match_their_formulas():
    """Transformer blocks of SD v1.5 at 64×64 latents, batch 2: tokens N and width d per block are
    (4096, 320), (1024, 640), (256, 1280), five blocks each (2 down, 3 up), and the middle's (64, 1280).
    GEGLU: x (N×d) → 8d → 4d → d: 2·B·N·(d·8d + 4d·d) = 2·B·12·N·d² FLOPs.
    Self-attention: QKᵀ and AV, each 2·B·N²·d (summed over heads): 4·B·N²·d."""
    blocks = [(4096, 320)] * 5 + [(1024, 640)] * 5 + [(256, 1280)] * 5 + [(64, 1280)]
    b = 2
    by_kind = unet_flops_by_block(UNetConfig.sd15(), batch=b)
    assert by_kind["feed-forward (GEGLU)"] == sum(2 * b * 12 * n * d * d for n, d in blocks)       # 307.0 GFLOP
    assert by_kind["self-attention itself: QKᵀ and AV"] == sum(4 * b * n * n * d for n, d in blocks)  # 245.0 GFLOP


def test_block_kind_files_each_module_by_its_name():
    t = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert block_kind(f"{t}.attn1") == "self-attention itself: QKᵀ and AV"
    assert block_kind(f"{t}.attn2") == "cross-attention itself: QKᵀ and AV"
    assert block_kind(f"{t}.attn2.to_k") == block_kind(f"{t}.attn1.to_out.0") == "attention projections: Q, K, V, out"
    assert block_kind(f"{t}.ff.net.0.proj") == "feed-forward (GEGLU)"
    assert block_kind("down_blocks.0.attentions.0.proj_in") == "transformer proj_in / proj_out (1×1 convs)"
    assert block_kind("up_blocks.1.resnets.2.conv_shortcut") == KINDS[0]
    assert block_kind("up_blocks.1.upsamplers.0.conv") == block_kind("down_blocks.0.downsamplers.0.conv") == KINDS[6]
    assert block_kind("conv_in") == block_kind("time_embedding.linear_1") == KINDS[7]


def test_own_flops_subtracts_the_nearest_counted_ancestor():
    counts = {"UNet": 10, "UNet.blocks.0": 6, "UNet.blocks.0.conv": 4, "UNet.out": 3}   # no "UNet.blocks"
    assert own_flops(counts) == {"UNet": 1, "UNet.blocks.0": 2, "UNet.blocks.0.conv": 4, "UNet.out": 3}
