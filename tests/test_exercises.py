"""The classroom exercises (sdlearn.exercises): every check passes the right answer, catches each
planted mistake with that mistake's hint, reports a stub as not written; the capstone plugs a
learner's pieces into the package and draws the same latents as pipe.generate."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdlearn import exercises
from sdlearn.exercises import EXERCISES, NotWrittenYet, ExerciseFailed

NAMES = list(EXERCISES)


@pytest.mark.parametrize("name", NAMES)
def test_the_right_answer_passes(name):
    report = exercises.run_check(name, EXERCISES[name].reference)
    assert report.passed, report.message


@pytest.mark.parametrize("name", NAMES)
def test_each_planted_mistake_is_caught_with_its_hint(name):
    ex = EXERCISES[name]
    assert len(ex.mistakes) >= 2, f"{name}: an exercise plants at least two usual mistakes"
    for mistake in ex.mistakes:
        report = exercises.run_check(name, mistake.wrong)
        assert not report.passed, f"{name}: the planted mistake {mistake.hint!r} passed the check"
        assert mistake.hint in report.message, f"{name}: expected the hint {mistake.hint!r}, got {report.message!r}"


@pytest.mark.parametrize("name", NAMES)
def test_a_stub_is_not_written_yet(name):
    def stub(*args, **kwargs):
        raise NotImplementedError()
    report = exercises.run_check(name, stub)
    assert not report.passed and not report.written and "not written yet" in report.message
    with pytest.raises(NotWrittenYet):
        exercises.check(name, stub)


def test_check_raises_on_a_wrong_answer_and_saves_a_right_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(exercises.core.ENV_FOLDER, str(tmp_path))

    def timestep_embedding(t, dim):
        half = dim // 2
        a = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half) / half)
        return torch.cat([a.sin(), a.cos()], dim=-1)
    with pytest.raises(ExerciseFailed, match="cos half first"):
        exercises.check("timestep_embedding", timestep_embedding)
    assert "✗" in capsys.readouterr().out and not list(tmp_path.iterdir())

    def my_embedding(t, dim):
        half = dim // 2
        a = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half) / half)
        return torch.cat([a.cos(), a.sin()], dim=-1)
    exercises.check("timestep_embedding", my_embedding)
    assert "✓" in capsys.readouterr().out
    saved = exercises.load_saved()
    assert list(saved) == ["timestep_embedding"]
    t = torch.tensor([3, 700])
    assert torch.equal(saved["timestep_embedding"](t, 320), my_embedding(t, 320))


def test_a_function_that_raises_is_reported_in_plain_words():
    report = exercises.run_check("timestep_embedding", lambda t, dim: t.reshape(7, 7))
    assert not report.passed and "raised RuntimeError" in report.message


def test_unknown_exercise_names_the_known_ones():
    with pytest.raises(KeyError, match="timestep_embedding"):
        exercises.run_check("timestep_embeding", lambda t, d: t)


# ---------------------------------------------------------------------------------- capstone
# A learner's pieces, written out here independently of the package (as a learner would).

def my_timestep_embedding(t, dim):
    half = dim // 2
    a = t[:, None].float() * torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    return torch.cat([a.cos(), a.sin()], dim=-1)


def my_attention(q, k, v, heads):
    b, n, c = q.shape
    d = c // heads
    q, k, v = (z.reshape(b, -1, heads, d).transpose(1, 2) for z in (q, k, v))
    w = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    return (w @ v).transpose(1, 2).reshape(b, n, c)


def my_group_norm(x, groups, weight, bias, eps):
    b, c = x.shape[:2]
    g = x.reshape(b, groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)
    shape = (1, c) + (1,) * (x.dim() - 2)
    return g.reshape(x.shape) * weight.reshape(shape) + bias.reshape(shape)


def my_resblock(block, x, t_emb):
    h = block.conv1(F.silu(block.norm1(x)))
    h = h + block.time_emb_proj(F.silu(t_emb))[:, :, None, None]
    h = block.conv2(F.silu(block.norm2(h)))
    return (x if block.conv_shortcut is None else block.conv_shortcut(x)) + h


def my_betas(T, start, end):
    return torch.linspace(start ** 0.5, end ** 0.5, T) ** 2


def my_abar(betas):
    return torch.cumprod(1 - betas, 0)


def my_ddim_step(x, eps, a_t, a_prev):
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps


def my_cfg(eps_u, eps_c, g):
    return eps_u + g * (eps_c - eps_u)


def my_sample_loop(sampler, model, x, timesteps):
    for t in timesteps:
        x = sampler.step(model(sampler.scale_input(x, t), t), t, x).prev_sample
    return x


MINE = dict(timestep_embedding=my_timestep_embedding, attention=my_attention, group_norm=my_group_norm,
            resblock=my_resblock, scaled_linear_betas=my_betas, alphas_cumprod=my_abar, ddim_step=my_ddim_step,
            classifier_free_guidance=my_cfg, sample_loop=my_sample_loop)


def test_the_capstone_draws_the_packages_latents():
    """Your pieces inside the package give pipe.generate's latents to float rounding (they run
    in another order: attention without SDPA's fused kernel, GroupNorm by hand)."""
    from sdlearn import load_pipeline
    pipe = load_pipeline("tiny", fast=False)
    assert exercises.missing(MINE) == [] and exercises.missing({}) == list(exercises.PIECES)
    kwargs = dict(sampler="ddim", steps=10, seed=3)
    reference = pipe.generate("a red circle", **kwargs)
    calls = []
    spy = {k: (lambda f, k=k: lambda *a, **kw: (calls.append(k), f(*a, **kw))[1])(f) for k, f in MINE.items()}
    with exercises.use(spy, pipe):
        mine = pipe.generate("a red circle", **kwargs)
    assert set(calls) == set(exercises.PIECES), "every piece was called"
    err = ((mine.latents - reference.latents).norm() / reference.latents.norm()).item()
    assert err < 1e-5, err
    after = pipe.generate("a red circle", **kwargs)               # everything put back
    assert torch.equal(after.latents, reference.latents)


def test_the_capstone_uses_a_wrong_piece_and_says_what_is_missing():
    from sdlearn import load_pipeline
    pipe = load_pipeline("tiny", fast=False)
    kwargs = dict(sampler="ddim", steps=5, seed=1)
    reference = pipe.generate("a blue square", **kwargs)
    with exercises.use({"classifier_free_guidance": lambda u, c, g: c + g * (u - c)}):
        wrong = pipe.generate("a blue square", **kwargs)
    assert not torch.allclose(wrong.latents, reference.latents, atol=1e-3)
    with pytest.raises(NotWrittenYet, match="resblock"):
        with exercises.use({"attention": my_attention}, pipe, require_all=True):
            pass
    with pytest.raises(ValueError, match="unknown piece"):
        with exercises.use({"attnetion": my_attention}):
            pass
    with pytest.raises(ValueError, match="pass the pipeline"):
        with exercises.use({"alphas_cumprod": my_abar}):
            pass


def test_a_tensor_where_a_number_is_expected_is_named():
    from sdlearn.exercises.core import difference
    assert "expected a single number" in difference(torch.ones(4), 1.0, 1e-6, 1e-6)
    assert difference(torch.tensor(1.0), 1.0, 1e-6, 1e-6) is None


def test_a_saved_answer_keeps_the_modules_it_uses(tmp_path, monkeypatch):
    """An answer written with numpy (imported as np in the notebook) still runs from my_sd/."""
    monkeypatch.setenv(exercises.core.ENV_FOLDER, str(tmp_path / "my_sd"))
    source = tmp_path / "learner_np.py"
    source.write_text("import math\nimport numpy as np\nimport torch\n\n\n"
                      "def timestep_embedding(t, dim):\n"
                      "    half = dim // 2\n"
                      "    f = torch.from_numpy(np.exp(-math.log(10000) * np.arange(half) / half)).float()\n"
                      "    a = t[:, None].float() * f\n"
                      "    return torch.cat([a.cos(), a.sin()], dim=-1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import learner_np
    exercises.check("timestep_embedding", learner_np.timestep_embedding)
    saved = (tmp_path / "my_sd" / "timestep_embedding.py").read_text()
    assert "import numpy as np" in saved and saved.count("import math") == 1
    t = torch.tensor([5, 600])
    assert torch.equal(exercises.load_saved()["timestep_embedding"](t, 32), learner_np.timestep_embedding(t, 32))


def test_a_wrong_shape_gets_no_general_hint_about_values():
    message = exercises.run_check("timestep_embedding", lambda t, dim: torch.zeros(len(t), dim + 1)).message
    assert "has shape (4, 321)" in message and "Hint" not in message
