"""Notebook 04's exercises: the skip-shape reference agrees with what the up path eats, the
ResBlock and attention references are the package's modules, and a learner's answers pass."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sdlearn import exercises
from sdlearn.checkpoint import build_empty
from sdlearn.configs import ModelConfig, UNetConfig

EX = exercises.EXERCISES


def test_sd15_pushes_twelve_skips_one_per_up_resblock():
    shapes = EX["skip_shapes"].reference(UNetConfig.sd15(), 1, 64, 64)
    assert len(shapes) == 12 == sum(len(b.resnets) for b in build_empty("unet", ModelConfig.sd15()).up_blocks)
    assert shapes[0] == (1, 320, 64, 64) and shapes[-1] == (1, 1280, 8, 8)
    odd = EX["skip_shapes"].reference(UNetConfig.sd15(), 2, 9, 7)
    assert [s[2:] for s in odd[::3]] == [(9, 7), (5, 4), (3, 2), (2, 1)]


def test_the_up_path_eats_the_skips_in_reverse():
    """Every up ResBlock's input width is (what came from below) + (the skip popped): the reference's
    channels, read backwards, are exactly what the trace shows being concatenated."""
    cfg = UNetConfig.tiny()
    model = build_empty("unet", ModelConfig(unet=cfg))
    rows = model.trace_shapes(torch.zeros(1, 4, 8, 8, device="meta"), 10, torch.zeros(1, 77, 64, device="meta"))
    skips = EX["skip_shapes"].reference(cfg, 1, 8, 8)
    previous = None
    for name, shape_in, out in rows:
        if name.startswith("up_blocks") and ".resnets." in name:
            skip = skips.pop()
            assert shape_in[1] == previous + skip[1] and shape_in[2:] == skip[2:], name
        previous = out[1]
    assert skips == []


def test_a_learners_answers_pass():
    def resblock(block, x, t_emb):
        h = F.conv2d(F.silu(F.group_norm(x, block.norm1.num_groups, block.norm1.weight, block.norm1.bias, 1e-5)),
                     block.conv1.weight, block.conv1.bias, padding=1)
        h = h + F.linear(F.silu(t_emb), block.time_emb_proj.weight, block.time_emb_proj.bias)[..., None, None]
        h = block.conv2(F.silu(block.norm2(h)))
        return (block.conv_shortcut(x) if block.conv_shortcut is not None else x) + h

    def attention(q, k, v, heads):                     # an explicit loop over the heads
        d = q.shape[-1] // heads
        outs = []
        for i in range(heads):
            qi, ki, vi = (z[..., i * d:(i + 1) * d] for z in (q, k, v))
            outs.append(torch.softmax(qi @ ki.transpose(1, 2) / math.sqrt(d), dim=-1) @ vi)
        return torch.cat(outs, dim=-1)

    def skip_shapes(config, batch, height, width):
        ch, shapes = config.block_out_channels, [(batch, config.block_out_channels[0], height, width)]
        for level, c in enumerate(ch):
            shapes += [(batch, c, height, width)] * config.layers_per_block
            if level < len(ch) - 1:
                height, width = math.ceil(height / 2), math.ceil(width / 2)
                shapes.append((batch, c, height, width))
        return shapes

    for name, fn in [("resblock", resblock), ("attention", attention), ("skip_shapes", skip_shapes)]:
        report = exercises.run_check(name, fn)
        assert report.passed, report.message


def test_notebook_04_holds_each_exercise_the_nbgrader_way_in_under_2000_words():
    from classroom_cells import exercise_problems, main_body_words
    problems = [p for name in exercises.list_exercises("04_unet") for p in exercise_problems("04_unet", name)]
    assert problems == []
    assert main_body_words("04_unet") <= 2000
