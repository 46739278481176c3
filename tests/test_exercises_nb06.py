"""Notebook 06's exercises: the sampling loop's check compares with pipe.generate's own latents,
and img2img_timesteps' reference is the pipeline's start."""
from __future__ import annotations

import copy

import torch

from sdlearn import exercises, samplers
from sdlearn.exercises import EXERCISES
from sdlearn.exercises import nb06_sampling as nb06


def test_the_loop_cases_start_where_generate_starts_and_the_package_loop_ends_on_its_latents():
    """The check's reference asks pipe.generate; the package's own sample_loop, run on the case's
    sampler, model, x and timesteps, lands on the same latents (so a learner's loop that matches
    the package's passes)."""
    for case in EXERCISES["sample_loop"].cases():
        sampler, model, x, timesteps = copy.deepcopy(case.args)
        generated = nb06._generated(*case.args)
        loop = samplers.sample_loop(sampler, model, x, timesteps).x
        assert torch.equal(loop, generated), case.label


def test_a_four_line_loop_passes_and_each_planted_loop_changes_the_euler_latents():
    def sample_loop(sampler, model, x, timesteps):
        for t in timesteps:
            x = sampler.step(model(sampler.scale_input(x, t), t), t, x).prev_sample
        return x
    assert exercises.run_check("sample_loop", sample_loop).passed
    case = EXERCISES["sample_loop"].cases()[0]
    assert case.args[0].name == "euler"
    right = nb06._generated(*case.args)
    for mistake in EXERCISES["sample_loop"].mistakes:
        wrong = mistake.wrong(*copy.deepcopy(case.args))
        assert (wrong - right).abs().max() > 1e-3, mistake.hint


def test_img2img_timesteps_runs_as_many_steps_as_generate():
    from sdlearn import load_pipeline
    pipe = load_pipeline("tiny", fast=False)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ddim = samplers.get_sampler("ddim", pipe.schedule)
    ddim.set_timesteps(10)
    for strength in (0.25, 0.6):
        visit = EXERCISES["img2img_timesteps"].reference(ddim.timesteps, strength)
        run = pipe.generate("a red circle", image=image, strength=strength, steps=10, sampler="ddim", seed=0,
                            progress=False)
        assert run.steps_done == len(visit)
