"""The sizes of the three networks, as plain frozen dataclasses.

`sd15()` is Stable Diffusion v1.5 (checked against the real checkpoint's tensor shapes);
`tiny()` is the small model sdlearn trains itself and ships (same classes, small numbers).
Field names follow the diffusers / transformers `config.json` files, so a diffusers folder's
configuration maps over with `from_diffusers()`, and a config round-trips through JSON
(`to_dict()` / `from_dict()`), which is how the tiny checkpoint stores it in its metadata.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A configuration that sdlearn cannot build (unknown field, unsupported architecture)."""


class _Config:
    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; expected some of {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CLIPTextConfig(_Config):
    """CLIP ViT-L/14 text tower (OpenAI), as SD v1.x uses it. Names as in transformers."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5

    @classmethod
    def sd15(cls) -> "CLIPTextConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "CLIPTextConfig":
        return cls(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4)

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> "CLIPTextConfig":
        """From a transformers `text_encoder/config.json`."""
        act = cfg.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise ConfigError(f"text encoder uses hidden_act={act!r}; SD v1.x's CLIP uses 'quick_gelu' "
                              "(an OpenCLIP/SD 2.x text encoder is not supported)")
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg})


@dataclass(frozen=True)
class UNetConfig(_Config):
    """The conditional UNet of SD v1.x (CompVis `UNetModel`, diffusers `UNet2DConditionModel`).

    `attention_levels[i]` says whether level i has spatial transformers (SD v1.5: the first three).
    The middle block always has one. `num_heads` is what diffusers calls `attention_head_dim`
    (a historical misnomer: SD v1 has 8 heads everywhere, of size channels / 8).
    """
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    num_heads: int = 8
    cross_attention_dim: int = 768
    transformer_layers_per_block: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    sample_size: int = 64

    def __post_init__(self):
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ConfigError("attention_levels needs one entry per level of block_out_channels")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def sd15(cls) -> "UNetConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "UNetConfig":
        return cls(block_out_channels=(64, 128), attention_levels=(True, True), layers_per_block=1,
                   num_heads=4, cross_attention_dim=64, sample_size=8)

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> "UNetConfig":
        """From a diffusers `unet/config.json`; refuses what SD v1.x does not have."""
        if cfg.get("use_linear_projection"):
            raise ConfigError("this UNet uses linear proj_in/proj_out (an SD 2.x UNet); sdlearn loads SD v1.x")
        if cfg.get("addition_embed_type"):
            raise ConfigError(f"this UNet has addition_embed_type={cfg['addition_embed_type']!r} "
                              "(an SDXL UNet); sdlearn loads SD v1.x")
        heads = cfg.get("attention_head_dim", 8)
        if isinstance(heads, (list, tuple)):
            if len(set(heads)) != 1:
                raise ConfigError(f"per-level head counts {heads} (SD 2.x style) are not supported")
            heads = heads[0]
        tlpb = cfg.get("transformer_layers_per_block", 1)
        if isinstance(tlpb, (list, tuple)):
            if len(set(tlpb)) != 1:
                raise ConfigError(f"per-level transformer depths {tlpb} (SDXL style) are not supported")
            tlpb = tlpb[0]
        down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            block_out_channels=tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280))),
            attention_levels=tuple("CrossAttn" in t for t in down),
            layers_per_block=cfg.get("layers_per_block", 2),
            num_heads=heads,
            cross_attention_dim=cfg.get("cross_attention_dim", 768),
            transformer_layers_per_block=tlpb,
            norm_num_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            sample_size=cfg.get("sample_size", 64),
        )


@dataclass(frozen=True)
class VAEConfig(_Config):
    """The KL autoencoder (CompVis `AutoencoderKL`, f = 8, 4 latent channels)."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int = 512

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd15(cls) -> "VAEConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "VAEConfig":
        return cls(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=32,
                   scaling_factor=0.76, sample_size=64)

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> "VAEConfig":
        """From a diffusers `vae/config.json`."""
        return cls(
            in_channels=cfg.get("in_channels", 3),
            out_channels=cfg.get("out_channels", 3),
            block_out_channels=tuple(cfg.get("block_out_channels", (128, 256, 512, 512))),
            layers_per_block=cfg.get("layers_per_block", 2),
            latent_channels=cfg.get("latent_channels", 4),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            scaling_factor=cfg.get("scaling_factor", 0.18215),
            sample_size=cfg.get("sample_size", 512),
        )


@dataclass(frozen=True)
class ModelConfig(_Config):
    """The three networks of one checkpoint together."""
    text_encoder: CLIPTextConfig = CLIPTextConfig()
    unet: UNetConfig = UNetConfig()
    vae: VAEConfig = VAEConfig()

    @classmethod
    def sd15(cls) -> "ModelConfig":
        return cls(CLIPTextConfig.sd15(), UNetConfig.sd15(), VAEConfig.sd15())

    @classmethod
    def tiny(cls) -> "ModelConfig":
        return cls(CLIPTextConfig.tiny(), UNetConfig.tiny(), VAEConfig.tiny())

    @classmethod
    def micro(cls) -> "ModelConfig":
        """The smallest sensible model, for tests and smoke runs of training (milliseconds per step)."""
        return cls(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                   UNetConfig(block_out_channels=(16, 32), attention_levels=(False, True), layers_per_block=1,
                              num_heads=2, cross_attention_dim=32, norm_num_groups=8, sample_size=8),
                   VAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64))

    def to_dict(self) -> dict[str, Any]:
        return {"text_encoder": self.text_encoder.to_dict(), "unet": self.unet.to_dict(), "vae": self.vae.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        missing = {"text_encoder", "unet", "vae"} - set(d)
        if missing:
            raise ConfigError(f"model config lacks {sorted(missing)}")
        return cls(CLIPTextConfig.from_dict(d["text_encoder"]), UNetConfig.from_dict(d["unet"]),
                   VAEConfig.from_dict(d["vae"]))
