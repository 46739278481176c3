"""Notebook 07's exercises: word_maps' reference is what generate(attention_maps=True) computes,
on probabilities recorded from the tiny model; strongest_word compares scaled maps."""
from __future__ import annotations

import torch

from sdlearn import attention_maps, load_pipeline
from sdlearn.attention import AttentionRecorder
from sdlearn.exercises import EXERCISES


def test_word_maps_reference_matches_the_recorder_generate_uses_on_real_probabilities():
    pipe = load_pipeline("tiny", fast=False)
    prompt = "a large red circle on the left"
    context = pipe.encode_prompts([prompt], [""])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), AttentionRecorder(select=attention_maps.is_cross_attention) as rec:
        pipe.unet(torch.cat([x, x]), 981, context)
    probs = [calls[0] for calls in rec.maps.values()]
    words, index = attention_maps.word_tokens(pipe.tokenizer, prompt)
    positions = [[k - 1 for k in i] for i in index]          # the exercise counts from the prompt's first token
    mine = EXERCISES["word_maps"].reference(probs, positions, (64, 64))

    acc = attention_maps.CrossAttentionMaps(rows=slice(1, 2), latent_size=(8, 8))
    with torch.no_grad(), acc:
        pipe.unet(torch.cat([x, x]), 981, context)
    package = attention_maps.word_maps(pipe.tokenizer, prompt, acc.token_maps((64, 64))[0])
    assert torch.allclose(mine, package.maps, atol=1e-6)


def test_strongest_word_scales_each_map_to_its_maximum():
    maps = torch.zeros(2, 1, 2)
    maps[0] = torch.tensor([[10.0, 9.0]])     # a loud word, flat
    maps[1] = torch.tensor([[0.1, 1.0]])      # a quiet word that peaks on the right
    assert attention_maps.strongest_word(maps).tolist() == [[0, 1]]
