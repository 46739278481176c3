"""Cross-attention maps split by step and by layer, and an interactive guidance explorer.

The functions here are plain: they run `Pipeline.generate` with extra recorders around it and
return tensors and figures, so they are tested without a kernel. The ipywidgets explorer
(`GuidanceExplorer.widget`) only wires controls to them.

    result, windows = attention_over_steps(pipe, "a red circle on the left", every=5, seed=0)
    windows[0]        # StepWindow(steps=range(0, 5), maps=WordMaps(...)): the maps of steps 0–4
    result, layers = attention_by_layer(pipe, "a red circle on the left", seed=0)
    layers[0]         # LayerMaps(tag="down_blocks.0.attentions.0.transformer_blocks.0.attn2", size=(8, 8), maps=…)

    explorer = GuidanceExplorer(pipe)
    explorer.figure("a red circle on the left", guidance=7.5, steps=20, seed=0, word="red")
    explorer.widget()       # prompt, guidance, steps, seed and a word picker (needs a live kernel)

    interact(show, t=(0, 999, 1), schedule=["linear", "cosine"])   # sliders, or the static figure

ipywidgets is optional (the `notebooks` extra): it is imported behind a guard, and where it is
missing `GuidanceExplorer.widget` and `interact` print a one-line note and show the static figure
of the default settings instead of the controls.

Both splits add up to the maps `generate(..., attention_maps=True)` returns: every step and
every cross-attention layer adds the same number of head maps (one per head), so the whole-run
map is the plain mean of the per-window maps weighted by their number of steps, and the plain
mean of the per-layer maps.
"""
from __future__ import annotations

import functools
import inspect
from contextlib import ExitStack
from dataclasses import dataclass

import matplotlib.figure
import torch

from .attention_maps import CrossAttentionMaps, WordMaps, is_cross_attention, word_maps, word_tokens
from .images import read_picture
from .request import output_size
from .viz import heatmap_overlay, image_table

NO_WIDGETS = ("(ipywidgets is not installed, so this is the static figure for the settings below; "
              "`pip install ipywidgets` gives the sliders.)")


def ipywidgets_or_none():
    """The ipywidgets module, or None when it is not installed (the guard every control goes through)."""
    try:
        import ipywidgets
    except ImportError:
        return None
    return ipywidgets


def _static(fig):
    """Hand a figure to the notebook exactly once: out of pyplot's list (which the inline backend
    would show again at the end of the cell), returned for the cell to display."""
    import matplotlib.pyplot as plt   # as in viz.py: importing pyplot picks a backend
    if fig is not None:
        plt.close(fig)
    return fig


def interact(fn, **controls):
    """`ipywidgets.interact` with sliders that update on release; without ipywidgets, a one-line note
    and `fn` called once with its defaults (its figure is the static one).

    Each control is (min, max) or (min, max, step) for a slider (ints give an IntSlider), or a list
    for a drop-down; its starting value is `fn`'s default for that argument (else the slider's
    middle or the list's first item). Returns what the cell shows as its last expression: the
    `ipywidgets.interactive` box (controls and output), or without ipywidgets the static figure.
    """
    defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    start = {}
    for name, spec in controls.items():
        if name in defaults:
            start[name] = defaults[name]
        elif isinstance(spec, list):
            start[name] = spec[0]
        elif isinstance(spec, tuple):
            middle = (spec[0] + spec[1]) / 2
            start[name] = int(middle) if all(isinstance(v, int) for v in spec) else middle
        else:
            start[name] = spec             # a fixed value (or a widget, with ipywidgets)
    W = ipywidgets_or_none()
    if W is None:
        print(NO_WIDGETS.replace("the settings below", ", ".join(f"{k} = {v!r}" for k, v in start.items())))
        return _static(fn(**start))
    made = {}
    for name, spec in controls.items():
        if isinstance(spec, tuple):
            lo, hi, *step = spec
            cls = W.IntSlider if all(isinstance(v, int) for v in (lo, hi, *step)) else W.FloatSlider
            made[name] = cls(value=start[name], min=lo, max=hi, step=step[0] if step else (1 if cls is W.IntSlider else (hi - lo) / 100),
                             description=name, continuous_update=False)
        elif isinstance(spec, list):
            made[name] = W.Dropdown(options=spec, value=start[name], description=name)
        else:
            made[name] = spec
    @functools.wraps(fn)
    def shown(*args, **kwargs):            # a returned pyplot figure is shown once, as the result
        out = fn(*args, **kwargs)
        return _static(out) if isinstance(out, matplotlib.figure.Figure) else out

    return W.interactive(shown, **made)


# With one prompt and one image the UNet's batch is [unconditional, conditional] with guidance and
# [conditional] without: the conditional row is the last one either way.
CONDITIONAL_ROW = slice(-1, None)


@dataclass
class StepWindow:
    steps: range          # the 0-based sampler steps these maps average over
    maps: WordMaps


@dataclass
class LayerMaps:
    tag: str               # the cross-attention layer, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    size: tuple[int, int]  # its resolution in latent pixels (h_l, w_l)
    maps: WordMaps         # its maps over the whole run, upsampled to the image


def prompt_words(tokenizer, prompt: str) -> list[str]:
    """The words of a prompt that get an attention map (CLIP's pre-tokens, in order; the
    options of the explorer's word picker)."""
    return word_tokens(tokenizer, prompt)[0]


def cross_attention_tags(unet: torch.nn.Module) -> list[str]:
    """The UNet's cross-attention layers (`…attn2`), in the order the UNet calls them."""
    return [m.tag for m in unet.modules() if isinstance(getattr(m, "tag", None), str) and is_cross_attention(m.tag)]


def _latent_size(pipe, kwargs: dict) -> tuple[int, int]:
    """The latent (h, w) a generate call with these arguments works at (request.output_size ÷ 8);
    an image in `kwargs` has been decoded already (`_decode_image`)."""
    height, width = output_size(pipe, kwargs.get("height"), kwargs.get("width"), kwargs.get("image"),
                                kwargs.get("latents"))
    return height // pipe.latent_factor, width // pipe.latent_factor


def _decode_image(kwargs: dict) -> dict:
    """`kwargs` with an image given as a file path decoded, once: the latent size and `generate`
    both use the decoded picture."""
    return {**kwargs, "image": read_picture(kwargs["image"])} if kwargs.get("image") is not None else kwargs


def _check_single(prompt, kwargs: dict) -> None:
    if not isinstance(prompt, str) or kwargs.get("num_images", 1) != 1:
        raise ValueError("attention maps per step or per layer are made for one prompt (a string) and one "
                         f"image; got prompt={prompt!r}, num_images={kwargs.get('num_images', 1)}")
    if kwargs.get("attention_maps") or kwargs.get("callback"):
        raise ValueError("attention_maps= and callback= are set by this function; leave them out")


def _maps_of(pipe, prompt: str, sums: dict, count: int, size: tuple[int, int]) -> WordMaps:
    acc = CrossAttentionMaps()
    acc.sums, acc.count = sums, count
    return word_maps(pipe.tokenizer, prompt, acc.token_maps(size)[0])


def attention_over_steps(pipe, prompt: str, *, every: int = 5, **generate_kwargs):
    """Generate once and split the cross-attention maps into windows of `every` steps.

    A recorder around `generate` keeps running sums; after every `every`-th step (and the last)
    the callback takes a snapshot, and a window's maps are the difference of two snapshots:

        M_window = (S_end − S_start) / (n_end − n_start)        S: summed head maps, n: their count

    Returns (the GenerationResult, [StepWindow, …]). `generate_kwargs` go to `pipe.generate`
    (seed, guidance, steps, sampler, …; not callback or attention_maps).
    """
    _check_single(prompt, generate_kwargs)
    if every < 1:
        raise ValueError(f"every must be a positive number of steps; got {every}")
    generate_kwargs = _decode_image(generate_kwargs)
    rec = CrossAttentionMaps(rows=CONDITIONAL_ROW, latent_size=_latent_size(pipe, generate_kwargs))
    snapshots = [(0, {}, 0)]                          # (steps done, sums, count)

    def snapshot(info) -> None:
        done = info.step + 1
        if done % every == 0 or done == info.num_steps:
            snapshots.append((done, {k: v.clone() for k, v in rec.sums.items()}, rec.count))

    generate_kwargs.setdefault("progress", False)
    with rec:
        result = pipe.generate(prompt, callback=snapshot, **generate_kwargs)
    size = tuple(result.pixels.shape[-2:])
    windows = []
    for (n0, s0, c0), (n1, s1, c1) in zip(snapshots, snapshots[1:]):
        diff = {k: v - s0[k] if k in s0 else v for k, v in s1.items()}
        windows.append(StepWindow(range(n0, n1), _maps_of(pipe, prompt, diff, c1 - c0, size)))
    return result, windows


def attention_by_layer(pipe, prompt: str, **generate_kwargs):
    """Generate once with one recorder per cross-attention layer: each layer's own maps, averaged
    over its heads and all steps, upsampled to the image.

    Returns (the GenerationResult, [LayerMaps, …] in the UNet's call order: down, mid, up).
    """
    _check_single(prompt, generate_kwargs)
    generate_kwargs = _decode_image(generate_kwargs)
    latent_size = _latent_size(pipe, generate_kwargs)
    recorders = {}
    for tag in cross_attention_tags(pipe.unet):
        rec = CrossAttentionMaps(rows=CONDITIONAL_ROW, latent_size=latent_size)
        rec.select = lambda t, tag=tag: t == tag
        recorders[tag] = rec
    if not recorders:
        raise ValueError("this UNet has no cross-attention layers (…attn2) to record")
    generate_kwargs.setdefault("progress", False)
    with ExitStack() as stack:
        for rec in recorders.values():
            stack.enter_context(rec)
        result = pipe.generate(prompt, **generate_kwargs)
    size = tuple(result.pixels.shape[-2:])
    return result, [LayerMaps(tag, next(iter(rec.sums)), _maps_of(pipe, prompt, rec.sums, rec.count, size))
                    for tag, rec in recorders.items()]


def mass_inside(heat: torch.Tensor, region: torch.Tensor) -> float:
    """The fraction of a map's total that falls inside a boolean region (H, W): 1 = all of it,
    region.mean() = no preference for the region."""
    heat = heat.float().cpu()
    if heat.shape != region.shape:
        raise ValueError(f"the map is {tuple(heat.shape)} but the region is {tuple(region.shape)}; pass them at one size")
    total = heat.sum().item()
    return heat[region.cpu()].sum().item() / total if total > 0 else float("nan")


# ---------------------------------------------------------------------------- the explorer

class GuidanceExplorer:
    """Generate with attention maps and show the image next to one word's map, caching runs by
    their settings so that picking another word only redraws.

        explorer = GuidanceExplorer(pipe)
        explorer.figure(prompt, guidance=7.5, steps=20, seed=0, word="red")   # a Figure
        explorer.sweep_figure(prompt, [1, 3, 7.5, 15], steps=20, seed=0, word="red")
        explorer.widget()                                                     # ipywidgets
    """

    def __init__(self, pipe, *, sampler: str | None = None, cache_size: int = 32):
        self.pipe = pipe
        self.sampler = sampler
        self.cache_size = cache_size
        self._cache: dict[tuple, object] = {}
        self.runs = 0                          # generate calls made (the cache's misses)

    def run(self, prompt: str, guidance: float, steps: int, seed: int):
        """The GenerationResult (with attention maps) for these settings, from the cache if seen."""
        key = (prompt, float(guidance), int(steps), int(seed))
        if key not in self._cache:
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self.pipe.generate(prompt, guidance=guidance, steps=steps, seed=seed,
                                                  sampler=self.sampler, attention_maps=True, progress=False)
            self.runs += 1
        return self._cache[key]

    @staticmethod
    def _word_index(maps: WordMaps, word: str | int | None) -> int | None:
        if word is None or not len(maps):
            return None
        if isinstance(word, int):
            if not 0 <= word < len(maps):
                raise IndexError(f"word {word} is out of range: the prompt has {len(maps)} words {maps.words}")
            return word
        if word not in maps.words:
            raise KeyError(f"{word!r} is not a word of the prompt; its words are {maps.words}")
        return maps.words.index(word)

    def figure(self, prompt: str, *, guidance: float = 7.5, steps: int = 20, seed: int = 0,
               word: str | int | None = None, size: float = 2.4):
        """Two panels: the image (titled with the settings) and `word`'s attention map over it
        (titled with its share of the attention). Returns the Figure."""
        result = self.run(prompt, guidance, steps, seed)
        maps = result.attention_maps[0]
        i = self._word_index(maps, word)
        image = result.pixels[0]
        overlay = heatmap_overlay(image, maps.maps[i]) if i is not None else None
        label = f"'{maps.words[i]}': {100 * maps.maps[i].mean().item():.1f} % of the attention" if i is not None else ""
        return image_table({"": [image, overlay]}, [f"g = {guidance:g}, {steps} steps, seed {seed}", label],
                           size=size, fontsize=8)

    def sweep_figure(self, prompt: str, guidances, *, steps: int = 20, seed: int = 0,
                     word: str | int | None = None, size: float = 1.3):
        """The static counterpart of the widget: one column per guidance scale, the images above
        and `word`'s attention maps below. Returns the Figure."""
        results = [self.run(prompt, g, steps, seed) for g in guidances]
        i = self._word_index(results[0].attention_maps[0], word)
        rows = {"image": [r.pixels[0] for r in results]}
        if i is not None:
            rows[f"'{results[0].attention_maps[0].words[i]}'"] = [
                heatmap_overlay(r.pixels[0], r.attention_maps[0].maps[i]) for r in results]
        return image_table(rows, [f"g = {g:g}" for g in guidances], size=size)

    def widget(self, prompt: str = "a large red circle on the left", *, guidance: float = 7.5,
               steps: int | None = None, seed: int = 0, word: str | None = None):
        """Text box, guidance and steps sliders, a seed box, a word picker, and the figure below
        them; runs on every change (the word picker only redraws). Without ipywidgets: a one-line
        note and the static figure of these settings (`figure`), returned."""
        import matplotlib.pyplot as plt         # as in viz.py: pyplot picks a backend when imported

        steps = steps or self.pipe.default_steps
        W = ipywidgets_or_none()                # optional: only the interactive explorer needs it
        if W is None:
            words = prompt_words(self.pipe.tokenizer, prompt)
            word = word if word is not None else (words[-1] if words else None)
            print(NO_WIDGETS.replace("the settings below", f"guidance {guidance:g}, {steps} steps, seed {seed}"
                                     + (f", word '{word}'" if word is not None else "")))
            return _static(self.figure(prompt, guidance=guidance, steps=steps, seed=seed, word=word))
        from IPython.display import display   # IPython comes with ipywidgets, optional like it
        controls = {
            "prompt": W.Text(value=prompt, description="prompt", continuous_update=False,
                             layout=W.Layout(width="32em")),
            "guidance": W.FloatSlider(value=guidance, min=0, max=20, step=0.5, description="guidance",
                                      continuous_update=False),
            "steps": W.IntSlider(value=steps, min=1, max=100, description="steps", continuous_update=False),
            "seed": W.BoundedIntText(value=seed, min=0, max=2 ** 31 - 1, description="seed"),
            "word": W.Dropdown(description="word"),
        }
        out = W.Output()

        busy = []            # set while the prompt handler updates the word picker

        def set_words():
            words = prompt_words(self.pipe.tokenizer, controls["prompt"].value)
            labels = [label for label, _ in controls["word"].options]
            old = labels[controls["word"].value] if controls["word"].value is not None else word
            controls["word"].options = [(w, i) for i, w in enumerate(words)]
            if words:        # keep the word picked before if the new prompt has it, else the last word
                controls["word"].value = words.index(old) if old in words else len(words) - 1

        def redraw(_=None):
            if busy:
                return
            fig = self.figure(controls["prompt"].value, guidance=controls["guidance"].value,
                              steps=controls["steps"].value, seed=controls["seed"].value,
                              word=controls["word"].value)
            with out:
                out.clear_output(wait=True)
                display(fig)
            plt.close(fig)
            box.figures += 1

        def new_prompt(_=None):
            busy.append(True)
            try:
                set_words()
            finally:
                busy.clear()
            redraw()

        set_words()
        controls["prompt"].observe(new_prompt, names="value")
        for name in ("guidance", "steps", "seed", "word"):
            controls[name].observe(redraw, names="value")
        box = W.VBox([W.HBox([controls["prompt"], controls["word"]]),
                      W.HBox([controls["guidance"], controls["steps"], controls["seed"]]), out])
        box.controls = controls      # for tests and for driving the explorer from code
        box.figures = 0              # figures drawn so far
        redraw()
        return box
