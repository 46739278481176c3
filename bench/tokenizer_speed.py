"""Tokenizer speed: ten-word prompts per second with the piece cache warm (target ≥ 20,000/s).

    .venv/bin/python bench/tokenizer_speed.py [--prompts 5000] [--rounds 7]

Times sdlearn's tokenizer and transformers' CLIPTokenizer (Rust, if transformers is installed)
alternately in this process, one prompt per call and one batch of all prompts per call, and
prints the median rate of each and sdlearn's ratio to the reference.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from sdlearn.tokenizer import default_tokenizer, read_bundled_vocab


def ten_word_prompts(tok, n: int, seed: int = 0) -> list[str]:
    """Random prompts of ten words drawn from the vocabulary's whole words."""
    words = [s[:-4] for s in list(tok.encoder)[512:20000] if s.endswith("</w>") and s[:-4].isalpha()]
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(10)) for _ in range(n)]


def reference_tokenizer():
    try:
        from transformers import CLIPTokenizer
    except ImportError:
        return None
    vocab, merges = read_bundled_vocab()
    folder = Path(tempfile.mkdtemp())
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    hf = CLIPTokenizer.from_pretrained(str(folder))
    return lambda texts: hf(texts, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids


def rate(fn, prompts, single: bool) -> float:
    start = time.perf_counter()
    if single:
        for p in prompts:
            fn(p)
    else:
        fn(prompts)
    return len(prompts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    tok = default_tokenizer()
    prompts = ten_word_prompts(tok, args.prompts)
    contenders = {"sdlearn": tok}
    ref = reference_tokenizer()
    if ref is not None:
        contenders["transformers"] = ref
    for fn in contenders.values():          # warm: every piece is in the cache
        fn(prompts)

    ours = []
    for single in (True, False):
        rates = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                rates[name].append(rate(fn, prompts, single))
        label = "one prompt per call " if single else f"batch of {len(prompts)} "
        medians = {name: statistics.median(r) for name, r in rates.items()}
        ours.append(medians["sdlearn"])
        line = "  ".join(f"{name} {m:,.0f}/s" for name, m in medians.items())
        if "transformers" in medians:
            line += f"  (sdlearn / transformers = {medians['sdlearn'] / medians['transformers']:.2f})"
        print(f"{label:>24}: {line}")
    print(f"target ≥ 20,000 prompts/s: {'met' if min(ours) >= 20_000 else 'NOT met'} "
          f"(sdlearn's slower mode: {min(ours):,.0f}/s)")


if __name__ == "__main__":
    main()
