"""Reference checkpoints generated at test time, never committed.

* `original_file(config)`: an SD v1.x single file in the original CompVis layout, written from
  randomly initialised CompVis `ldm` modules (UNetModel, Encoder, Decoder) and a transformers
  CLIPTextModel, so every key name comes from the reference code, not from a hand-typed list.
* `diffusers_folder(config)`: a diffusers StableDiffusionPipeline folder with the same
  architecture (random weights; used as the `config=` of `from_single_file`, and as a folder to
  load by itself).
* `diffusers_from_original(config)`: diffusers' own conversion of the original file, i.e. the
  same weights in the diffusers layout.

Files are cached under .cache/tests/checkpoints/<name>.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from reference import cache_dir, randomize_
from sdlearn.configs import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig

VOCAB_GZ = Path(__file__).resolve().parents[1] / "sdlearn" / "data" / "bpe_simple_vocab_16e6.txt.gz"


# ---- diffusers / transformers / ldm constructor arguments for sdlearn configs -----------------

def diffusers_unet_kwargs(cfg: UNetConfig) -> dict:
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)]
    return dict(sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                down_block_types=tuple(down), up_block_types=tuple(up),
                block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                attention_head_dim=cfg.num_heads, cross_attention_dim=cfg.cross_attention_dim,
                transformer_layers_per_block=cfg.transformer_layers_per_block,
                norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps)


def diffusers_vae_kwargs(cfg: VAEConfig) -> dict:
    n = len(cfg.block_out_channels)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                sample_size=cfg.sample_size, scaling_factor=cfg.scaling_factor)


def transformers_clip_kwargs(cfg: CLIPTextConfig) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                max_position_embeddings=cfg.max_position_embeddings, layer_norm_eps=cfg.layer_norm_eps,
                hidden_act="quick_gelu", projection_dim=cfg.hidden_size,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def ldm_unet(cfg: UNetConfig):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    ch = cfg.block_out_channels
    return UNetModel(image_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                     model_channels=ch[0], num_res_blocks=cfg.layers_per_block,
                     attention_resolutions=[2 ** i for i, a in enumerate(cfg.attention_levels) if a],
                     channel_mult=[c // ch[0] for c in ch], num_heads=cfg.num_heads,
                     use_spatial_transformer=True, transformer_depth=cfg.transformer_layers_per_block,
                     context_dim=cfg.cross_attention_dim, legacy=False, use_checkpoint=False)


def ldm_vae_parts(cfg: VAEConfig) -> dict[str, torch.nn.Module]:
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    ch = cfg.block_out_channels
    common = dict(ch=ch[0], out_ch=cfg.out_channels, ch_mult=[c // ch[0] for c in ch],
                  num_res_blocks=cfg.layers_per_block, attn_resolutions=[], in_channels=cfg.in_channels,
                  resolution=cfg.sample_size, z_channels=cfg.latent_channels)
    z = cfg.latent_channels
    return {"encoder": Encoder(double_z=True, **common), "decoder": Decoder(**common),
            "quant_conv": torch.nn.Conv2d(2 * z, 2 * z, 1), "post_quant_conv": torch.nn.Conv2d(z, z, 1)}


# ---- tokenizer files ------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt (the Hugging Face format) from OpenAI's bpe_simple_vocab_16e6."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if vocab_path.exists() and merges_path.exists():
        return vocab_path, merges_path
    gz = VOCAB_GZ
    lines = gzip.open(gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_path, merges_path


# ---- the checkpoints -------------------------------------------------------------------------

def _name(config: ModelConfig, seed: int) -> str:
    import hashlib
    return hashlib.sha1(json.dumps([config.to_dict(), seed], sort_keys=True).encode()).hexdigest()[:12]


def original_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the exact key names of the CompVis code (and position_ids as real
    SD v1.x files have them)."""
    from transformers import CLIPTextConfig as HFConfig, CLIPTextModel as HFModel

    torch.manual_seed(seed)
    sd = {}
    unet = randomize_(ldm_unet(config.unet), seed)
    sd.update({"model.diffusion_model." + k: v for k, v in unet.state_dict().items()})
    for part, module in ldm_vae_parts(config.vae).items():
        randomize_(module, seed + 1)
        sd.update({f"first_stage_model.{part}.{k}": v for k, v in module.state_dict().items()})
    clip = randomize_(HFModel(HFConfig(**transformers_clip_kwargs(config.text_encoder))), seed + 2)
    for k, v in clip.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k
        sd["cond_stage_model.transformer." + k] = v
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(
        config.text_encoder.max_position_embeddings)[None]
    sd["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)   # schedule buffers, as real files have
    return {k: v.contiguous() for k, v in sd.items()}


def original_file(config: ModelConfig, seed: int = 0, dtype: torch.dtype | None = None,
                  with_config: bool | None = None) -> Path:
    """The original single file. Real SD v1.x files carry no configuration, and sdlearn takes such a
    file to be SD v1.5; other sizes carry theirs in the metadata (as the tiny model does).
    `with_config` defaults to "unless the config is SD v1.5"."""
    if with_config is None:
        with_config = config != ModelConfig.sd15()
    folder = cache_dir("checkpoints", _name(config, seed))
    suffix = ("" if dtype is None else "-" + str(dtype).replace("torch.", "")) + ("" if with_config else "-nometa")
    path = folder / f"original{suffix}.safetensors"
    if not path.exists():
        sd = original_state_dict(config, seed)
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        tmp = path.with_suffix(".partial")
        meta = {"sdlearn_config": json.dumps(config.to_dict())} if with_config else None
        save_file(sd, str(tmp), metadata=meta)
        tmp.rename(path)
    return path


def diffusers_pipeline(config: ModelConfig, seed: int = 100):
    """A random diffusers StableDiffusionPipeline of this architecture."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFConfig, CLIPTextModel as HFModel, CLIPTokenizer

    vocab, merges = write_tokenizer_files(cache_dir("tokenizer-files"))
    torch.manual_seed(seed)
    unet = randomize_(UNet2DConditionModel(**diffusers_unet_kwargs(config.unet)), seed)
    vae = randomize_(AutoencoderKL(**diffusers_vae_kwargs(config.vae)), seed + 1)
    text = randomize_(HFModel(HFConfig(**transformers_clip_kwargs(config.text_encoder))), seed + 2)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)
    tok = CLIPTokenizer(str(vocab), str(merges))
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def diffusers_folder(config: ModelConfig, seed: int = 100, variant: str | None = None) -> Path:
    folder = cache_dir("checkpoints", _name(config, seed)) / ("diffusers" + (f"-{variant}" if variant else ""))
    if not (folder / "model_index.json").exists():
        pipe = diffusers_pipeline(config, seed)
        if variant == "fp16":
            pipe = pipe.to(torch.float16)
        pipe.save_pretrained(folder, variant=variant)
    return folder


def diffusers_from_original(config: ModelConfig, seed: int = 0):
    """diffusers' own conversion of `original_file(config, seed)`."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(
        str(original_file(config, seed)), config=str(diffusers_folder(config)), local_files_only=True,
        safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32)
