"""A check never shows the solution: no exercise's hint (the general one, shown when no planted
mistake explains a wrong answer, nor a planted mistake's) may read as code or spell out the
answer's formula. A hint points to the notebook's section, a shape, a quantity or a question.

Two nets: code-like text of any kind (a `torch.` call, a method call, `return <expression>`, an
assignment of a formula, a `[..., None]` index), and per exercise the fragments of its own
solution ("fingerprints"), compared with the hints with all spaces removed."""
from __future__ import annotations

import re

import pytest

from sdlearn.exercises import EXERCISES

# The key fragments of each exercise's answer, as the hints used to spell them out (spaces are
# ignored, case too). A new exercise needs an entry: what would a hint that gives it away say?
FINGERPRINTS: dict[str, list[str]] = {
    # 01 · weights
    "tensor_location": ["8 + N + begin", "data_start", "n + 8 +"],
    "tensor_nbytes": ["bytes = (", "product of the shape, 1 for shape [] ×", "F32: 4, I64: 8, U8: 1"],
    "sdlearn_key": ["startswith(block", "key == block", "put the rule's sdlearn block in its place"],
    "parameter_count": ["math.prod(entry", "prod(shape)", "math.prod([])", "add up math.prod"],
    # 02 · CLIP
    "bpe": ["take the lowest, merge every occurrence", "min(ranked", "ranks.get"],
    "causal_mask": ["tril", "j ≤ i", "j <= i", "arange(n)"],
    "attention_head": ["q kᵀ / √d", "q @ k.T", "softmax over each row; times v", "−∞ above the diagonal"],
    "quick_gelu": ["x · sigmoid(1.702", "x·σ(1.702·x)", "x * torch.sigmoid", "σ(1.702·x) alone"],
    "pad_ids": ["[49406] +", "+ [49407]", "ids[:75]", "[:length - 2]", "* (length"],
    # 03 · the noise schedule
    "scaled_linear_betas": ["linspace(", "** 2", "√β rises in equal steps"],
    "alphas_cumprod": ["cumprod(1", "(1 − β_0)(1 − β_1)", "running product of α_s = 1 − β_s"],
    "q_sample": ["√ᾱ_t·x0 + √(1 − ᾱ_t)", "√ᾱ_t on x0 and √(1 − ᾱ_t) on the noise", "alphas_cumprod[t]"],
    "ddpm_posterior": ["√ᾱ_{t−1}·β_t/(1 − ᾱ_t)", "√α_t·(1 − ᾱ_{t−1})/(1 − ᾱ_t)", "(1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t",
                       "√ᾱ_{t−1} on x0 and √α_t on x_t"],
    "ddim_step": ["√ᾱ_prev·x̂₀", "(x − √(1 − ᾱ_t)·ε)/√ᾱ_t", "√(1 − ᾱ_prev)·ε", "√ᾱ_prev on x̂₀"],
    # 04 · the UNet
    "timestep_embedding": ["exp(−ln(10000)", "10000^(−i", "torch.cat"],
    "skip_shapes": ["(n + 1) // 2", "one skip per ResBlock (layers_per_block) and", "except at the last level, one"],
    "resblock": ["conv1(SiLU(norm1(x)))", "shortcut(x) + h", "[:, :, None, None]", "time_emb_proj(SiLU(t_emb))"],
    "attention": ["softmax(Q Kᵀ / √d) V", "The scores are Q Kᵀ / √d"],
    # 05 · the VAE
    "group_norm": ["reshape x to (B, num_groups", "unbiased=False", "mean of the squared deviations"],
    "sample_latent": ["z = μ + σ·ε", "exp(½ · logvar)", "exp(0.5"],
    "scaling_factor": ["1 / (standard deviation", "1 / std", "1 / standard deviation"],
    # 06 · sampling
    "classifier_free_guidance": ["ε_u + s", "u + g * (c - u)", "+ scale · (ε_c − ε_u)"],
    "sample_loop": ["scale_input(x, t)", "sampler.step(model(", "the step gets the model's ε, t and the sampler's own x"],
    "img2img_timesteps": ["timesteps[n - int(", "timesteps[-int(", "[len(timesteps) -"],
    # 07 · attention maps
    "cross_attention_probs": ["softmax(Q Kᵀ / √d)", "(q @ k.transpose"],
    "word_maps": ["tokens[[j + 1", ".mean(dim=", "interpolate(", "row 1, the mean over heads"],
    "strongest_word": ["amax(", "argmax(dim=0)", "keep the index of the largest"],
    "mass_inside": [".sum() /", "heat[region]", "divide by the whole map's sum"],
    # 08 · training
    "training_latents": ["scaling_factor * (mean + std", "z · scaling_factor", "μ + σ·ε is multiplied"],
    "training_loss": ["torch.where", "√ᾱ_t · z₀", "mse_loss("],
    "ema_update": ["d·θ_ema + (1 − d)·θ", "min(decay, (1 + step) / (10 + step))"],
    # 09 · customising
    "slerp": ["sin((1 − t)θ)/sin θ", "θ = arccos(", "sin(tθ)/sin θ"],
    "emphasis": ["z.mean() / weighted.mean()", "mean(z) / mean(weighted)", "multipliers[..., None]",
                 "z.mean(), not z.mean(-1)"],
    "nearest_rows": ["E_i·v / (‖E_i‖‖v‖)", "cosine_similarity(", "⟨a, b⟩ / (‖a‖"],
    "lora_delta": ["scale · (α / r) · (up @ down)", "scale · (α / r) · up @ down", "r = down.shape[0]"],
}

_DTYPES = r"(?:bool|u?int\d*|long|half|float\d*|bfloat16|double)\b"
_OPERATORS = "·×*/+@−√^"


def _code_like(hint: str) -> list[str]:
    """The pieces of `hint` that read as code or as an assignment of a formula."""
    found = [m.group() for m in re.finditer(rf"\btorch\.(?!{_DTYPES})\w+", hint)]          # torch.tril
    found += [m.group() for m in re.finditer(r"[\w\])]\.[A-Za-z_]\w*\(", hint)]           # heat.sum(
    found += [m.group() for m in re.finditer(r"\[[^\]]*\bNone\b[^\]]*\]", hint)]          # [:, :, None, None]
    # `return x · s`, `return shortcut(x) + h`: return followed by an expression, not by words
    for m in re.finditer(r"\breturn\s+([^;:,]*?)(?=[;:,]|\.\s|\.?$)", hint):
        if any(c in m.group(1) for c in "([" + _OPERATORS):
            found.append(m.group())
    # `x_prev = √ᾱ_prev·x̂₀ + …`, `θ ← d·θ + …`: an assignment whose right side is a formula
    for m in re.finditer(r"(?<![=<>!≤≥])(?:=|←)(?!=)\s*([^;:,]*?)(?=[;:,]|\.\s|\.?$)", hint):
        rhs = m.group(1)
        if any(c in rhs for c in _OPERATORS) or " - " in rhs:
            found.append(hint[max(0, m.start() - 12):m.end()])
    return found


def _squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def _fingerprints(name: str, hint: str) -> list[str]:
    return [f for f in FINGERPRINTS.get(name, []) if _squeeze(f) in _squeeze(hint)]


def _giveaways(name: str, hint: str) -> list[str]:
    return _code_like(hint) + _fingerprints(name, hint)


def _series() -> dict:
    """The series' exercises (notebooks 01–09), not one a test registers for itself (the classroom
    fixture's)."""
    return {name: ex for name, ex in EXERCISES.items() if ex.notebook[:2].isdigit()}


def _hints() -> list[tuple[str, str, str]]:
    out = []
    for name, ex in _series().items():
        out.append((name, "general", ex.hint))
        out += [(name, f"mistake{i}", m.hint) for i, m in enumerate(ex.mistakes)]
    return out


HINTS = _hints()


@pytest.mark.parametrize("name, which, hint", HINTS, ids=[f"{n}-{w}" for n, w, _ in HINTS])
def test_no_hint_gives_the_solution_away(name, which, hint):
    found = _giveaways(name, hint)
    assert not found, f"{name} ({which}) shows the solution ({found}): {hint!r}"


def test_every_exercise_has_a_general_hint_and_fingerprints():
    for name, ex in _series().items():
        assert ex.hint.strip(), f"{name}: the general hint is empty"
        assert FINGERPRINTS.get(name), f"{name}: add the fragments a give-away hint would contain to FINGERPRINTS"


def test_the_nets_catch_hints_that_spell_out_the_answer():
    """The test above can fail: hints that gave the answer away (as some once did) are caught."""
    caught = {
        "ddim_step": "two lines: x̂₀ = (x − √(1 − ᾱ_t)·ε)/√ᾱ_t, then x_prev = √ᾱ_prev·x̂₀ + √(1 − ᾱ_prev)·ε.",
        "resblock": "h = conv1(SiLU(norm1(x))) + time_emb_proj(SiLU(t_emb))[:, :, None, None]; "
                    "h = conv2(SiLU(norm2(h))); return shortcut(x) + h.",
        "mass_inside": "heat[region].sum() / heat.sum(): 1 when all of the map is inside.",
        "causal_mask": "entry [i, j] is True exactly when j ≤ i (torch.tril keeps the diagonal and below).",
        "emphasis": "weighted = z · multipliers[..., None]; return weighted · (z.mean() / weighted.mean()).",
        "lora_delta": "r = down.shape[0]; ΔW = scale · (α / r) · (up @ down), an (out, in) matrix.",
    }
    for name, hint in caught.items():
        assert _code_like(hint) and _fingerprints(name, hint), f"{name}: {hint!r} was not caught by both nets"
    assert _code_like("did you divide by √d?") == [] and _code_like("padding should be 49407") == []
    assert _code_like("your embedding starts with sin; SD puts the cos half first") == []
