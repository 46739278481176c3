"""Where a UNet call's arithmetic goes: its floating-point operations by kind of block.

    >>> from sdlearn.configs import UNetConfig
    >>> for kind, flops in unet_flops_by_block(UNetConfig.sd15()).items():
    ...     print(f"{kind:45s} {flops / 1e9:8.1f} GFLOP")

torch's FlopCounterMode counts the operations of each module, its children's included
(`unet.flop_counter`). A module's own operations are its count less its children's:

    own(m) = count(m) − Σ count(c)   over m's children c (the nearest counted modules below m)

so an attention module's own operations are the two products inside scaled_dot_product_attention
(QKᵀ and the weighted sum of V), and its Linear children's are the projections. Each module's own
count is then filed under one kind by its name (`block_kind`); the kinds sum to `flops_per_call`.
"""
from __future__ import annotations

from .configs import UNetConfig
from .unet import flop_counter

# Kinds in the order a UNet call meets them (the table's rows).
KINDS = (
    "ResBlocks: 3×3 convs, 1×1 shortcuts, time projection",
    "transformer proj_in / proj_out (1×1 convs)",
    "attention projections: Q, K, V, out",
    "self-attention itself: QKᵀ and AV",
    "cross-attention itself: QKᵀ and AV",
    "feed-forward (GEGLU)",
    "down/up sampling convs",
    "conv_in, conv_out, time embedding",
)


def block_kind(name: str) -> str:
    """The kind of a module of sdlearn's UNet from its name (as in the state dict; FlopCounterMode
    prefixes it with "UNet.").  "down_blocks.0.attentions.0.transformer_blocks.0.attn1" → the
    self-attention's own products; "….attn1.to_q" → a projection."""
    parts = name.split(".")
    if "resnets" in parts:
        return KINDS[0]
    if parts[-1] in ("proj_in", "proj_out"):
        return KINDS[1]
    if any(p in ("attn1", "attn2") for p in parts[:-1]):            # to_q, to_k, to_v, to_out(.0)
        return KINDS[2]
    if parts[-1] == "attn1":
        return KINDS[3]
    if parts[-1] == "attn2":
        return KINDS[4]
    if "ff" in parts:
        return KINDS[5]
    if "downsamplers" in parts or "upsamplers" in parts:
        return KINDS[6]
    return KINDS[7]


def own_flops(counts: dict[str, int]) -> dict[str, int]:
    """{module name: FLOPs including its children} → {module name: FLOPs of its own operations}."""
    own = dict(counts)
    for name, flops in counts.items():
        parent = name.rpartition(".")[0]
        while parent and parent not in counts:          # containers without a forward (ModuleList)
            parent = parent.rpartition(".")[0]          # are not counted: skip to the next one up
        if parent:
            own[parent] -= flops
    return own


def unet_flops_by_block(config: UNetConfig, batch: int = 2) -> dict[str, int]:
    """FLOPs of one UNet call (batch 2: one guided step) by kind of block, in the order of KINDS;
    they sum to `unet.flops_per_call(config, batch)`."""
    counter = flop_counter(config, batch)
    counts = {name: sum(by_op.values()) for name, by_op in counter.get_flop_counts().items()
              if name != "Global"}                                  # "Global" is the whole call again
    by_kind = dict.fromkeys(KINDS, 0)
    for name, flops in own_flops(counts).items():
        if flops:
            by_kind[block_kind(name.removeprefix("UNet.").removeprefix("UNet"))] += flops
    return by_kind
