"""CLIP's byte-level BPE tokenizer, written out: a prompt becomes 77 token ids.

    "A photo of a cat,"
      clean   → "a photo of a cat,"            NFC, whitespace runs → " ", lower-case
      split   → a | photo | of | a | cat | ,   CLIP's pre-tokenizer pattern
      bytes   → each piece's UTF-8 bytes as printable characters (GPT-2's byte → unicode map)
      BPE     → merge the best-ranked adjacent pair until no ranked pair is left;
                the last symbol of a piece carries the word end: c a t</w> → ca t</w> → cat</w>
      ids     → [49406, 320, 1125, 539, 320, 2368, 267, 49407, 49407, …]   (77 ids)

Start 49406 and end 49407 wrap the pieces' ids; the rest is padded with the end token 49407
(SD v1's tokenizer; OpenAI's `clip.tokenize` pads with 0); a prompt longer than 75 pieces' ids
is cut to `[49406, 75 ids, 49407]`, with a warning naming the dropped words.

The reference is transformers' `CLIPTokenizer` as diffusers uses it. Its normaliser (transformers
5, `models/clip/tokenization_clip.py`) is NFC → `\\s+` → " " → lower-case, character by
character (so a final capital sigma becomes σ, not ς); it does not run ftfy or html.unescape as
OpenAI's `simple_tokenizer.py` does: `&amp;`, mojibake and full-width letters differ between the
two, and sdlearn follows transformers. The literals `<|startoftext|>` and `<|endoftext|>`,
written exactly so, become the special ids (matched before cleaning, as transformers' added
tokens are); in any other case they are ordinary text. A lone surrogate code point (not text:
UTF-8 cannot encode it) is read as U+FFFD "�" with a warning; transformers raises a TypeError.

The vocabulary is OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT licence, `data/LICENSE-CLIP.txt`):
256 byte symbols, the same 256 with `</w>`, one symbol per merge (48,894), and the two specials:
49,408 ids. A diffusers folder's `tokenizer/vocab.json` + `merges.txt` load with `from_folder`.
"""
from __future__ import annotations

import copy
import functools
import gzip
import json
import sys
import unicodedata
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import regex
import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"
N_MERGES = 49152 - 256 - 2          # OpenAI's simple_tokenizer.py: merges[1 : 49152 - 256 - 2 + 1]
BUNDLED_VOCAB = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

_SPECIAL = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_WHITESPACE = regex.compile(r"\s+")
# CLIP's pre-tokenizer pattern (OpenAI's simple_tokenizer.py, transformers' Split): the special
# literals, contractions, letter runs, single digits, punctuation runs.
_PIECE = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
_SPELLED_OUT = {BOS: ("<|", "startoftext", "|>"), EOS: ("<|", "endoftext", "|>")}

# Surrogate code points (U+D800–U+DFFF) are halves of UTF-16 pairs, not characters: UTF-8, and so
# the byte-level BPE, cannot encode them. A lone one is a high half not followed by a low half,
# or a low half not preceded by a high half.
_SURROGATE = regex.compile(r"[\ud800-\udfff]")
_LONE_SURROGATE = regex.compile(r"[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]")

_NO_RULE = float("inf")
_CACHE_LIMIT = 200_000                # entries per cache; cleared when full


def bytes_to_unicode() -> dict[int, str]:
    """The 256 byte values as 256 printable characters (GPT-2's trick, kept by CLIP).

    The order of the dict is the order of token ids 0-255: first the kept bytes, then the moved.
    The 188 printable Latin-1 bytes stand for themselves ("a" → "a"); the other 68 (controls,
    space, soft hyphen, …) move to U+0100 onwards in order, so no BPE symbol is whitespace.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep}                         # in this order: it fixes ids 0-255
    table.update({b: chr(256 + n) for n, b in enumerate(moved)})
    return table


def repair_surrogates(text: str, warn: bool = True) -> str:
    """Text that UTF-8 can encode. A pair of surrogates (UTF-16 written as two code points, as in
    "\\ud83d\\udc31") is joined into its character (🐱); a lone surrogate (broken UTF-16, or a byte
    that Python kept undecoded with errors="surrogateescape") becomes U+FFFD "�", the Unicode
    replacement character, with a warning naming where it was (unless warn=False). Other text is
    returned as it is.
    (transformers' tokenizer raises a TypeError on such text.)"""
    if not _SURROGATE.search(text):
        return text
    lone = [f"U+{ord(m.group()):04X} at {m.start()}" for m in _LONE_SURROGATE.finditer(text)]
    if lone and warn:
        warnings.warn(f"the prompt holds {len(lone)} lone surrogate code point(s), which are not text "
                      f"({', '.join(lone[:5])}{' …' if len(lone) > 5 else ''}); each became U+FFFD '\ufffd'. "
                      "Decode the text with errors='replace' to choose yourself", stacklevel=_caller_outside())
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def clean(text: str) -> str:
    """transformers' CLIP normaliser: NFC, every whitespace run → one space, lower-case.

    Lower-casing is per character, as in the `tokenizers` library: Python's `str.lower` would
    turn a word-final "Σ" into "ς"; per character it is "σ", which is what the reference gives.
    """
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    return text.lower() if "Σ" not in text else "".join(c.lower() for c in text)


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """One BPE merge: every occurrence of the adjacent `pair` joined into one symbol, left to
    right (so "a a a" with pair (a, a) becomes "aa a")."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def read_bundled_vocab(path: Path = BUNDLED_VOCAB) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI's merges file → (vocabulary {symbol: id}, merges in rank order).

    Ids: the 256 byte symbols, the same with `</w>`, the result of each merge, then the
    specials <|startoftext|> = 49406 and <|endoftext|> = 49407.
    """
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + N_MERGES]]   # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + WORD_END for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


class CLIPTokenizer:
    """Text → CLIP token ids, identical to transformers' `CLIPTokenizer` with
    `padding="max_length", max_length=77, truncation=True`.

        tok = default_tokenizer()
        tok("a red circle")              # LongTensor (1, 77)
        tok(["a", "b"])                  # LongTensor (2, 77)
        tok.encode("a red circle")       # [49406, 320, 736, 7117, 49407]   (no padding)
        tok.tokenize("a red circle")     # ['a</w>', 'red</w>', 'circle</w>']
        tok.bpe_steps("circle")          # the splits of one word, merge by merge
        tok.decode(ids)                  # 'a red circle'
    """

    model_max_length = 77

    def __init__(self, vocab: dict[str, int], merges: Iterable[Sequence[str]], pad_token: str = EOS):
        self.encoder = dict(vocab)
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks = {(a, b): rank for rank, (a, b) in enumerate(merges)}
        for name, tok in (("start", BOS), ("end", EOS), ("padding", pad_token)):
            if tok not in self.encoder:
                raise ValueError(f"the vocabulary lacks the {name} token {tok!r}; expected CLIP's "
                                 f"vocabulary (vocab.json of an SD v1.x tokenizer)")
        missing = [a + b for a, b in self.bpe_ranks if a + b not in self.encoder]
        if missing:
            raise ValueError(f"{len(missing)} merge results are not in the vocabulary (first: "
                             f"{missing[0]!r}); vocab.json and merges.txt do not belong together")
        self.bos_token_id = self.encoder[BOS]
        self.eos_token_id = self.encoder[EOS]
        self.pad_token_id = self.encoder[pad_token]
        self._special_ids = {BOS: self.bos_token_id, EOS: self.eos_token_id}
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._cache: dict[str, tuple[int, ...]] = {}   # pre-token piece → its ids
        self.added_tokens: dict[str, int] = {}           # textual inversion's tokens → ids ≥ 49408
        self._compile_added()

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def bundled(cls) -> "CLIPTokenizer":
        """The tokenizer of SD v1.x, from the vocabulary shipped inside sdlearn."""
        return cls(*read_bundled_vocab())

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, pad_token: str = EOS) -> "CLIPTokenizer":
        """From a Hugging Face `vocab.json` ({symbol: id}) and `merges.txt` (one "a b" per line)."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = [line.split(" ") for line in lines if line]
        bad = [line for line in merges if len(line) != 2]
        if bad:
            raise ValueError(f"{merges_txt}: expected two symbols per line, found {' '.join(bad[0])!r}")
        return cls(vocab, merges, pad_token)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, pad_token: str = EOS) -> "CLIPTokenizer":
        """From a Hugging Face "fast" `tokenizer.json` (what transformers 5 saves): the same
        vocabulary and merges, stored as model.vocab and model.merges ("a b" or ["a", "b"])."""
        model = json.loads(Path(path).read_text(encoding="utf-8")).get("model", {})
        if model.get("type") not in (None, "BPE") or "vocab" not in model or "merges" not in model:
            raise ValueError(f"{path}: expected a BPE tokenizer.json with model.vocab and model.merges")
        merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
        return cls(model["vocab"], merges, pad_token)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "CLIPTokenizer":
        """From a diffusers folder (its `tokenizer/`) or a folder holding vocab.json and merges.txt
        (transformers 4 and the SD v1.5 repos) or tokenizer.json (transformers 5).

        The padding token comes from `tokenizer_config.json` when there is one (SD v1.x:
        <|endoftext|>), else it is the end token.
        """
        folder = Path(folder)
        if (folder / "tokenizer").is_dir():
            folder = folder / "tokenizer"
        vocab, merges, fast = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
        pad = EOS
        config = folder / "tokenizer_config.json"
        if config.is_file():
            pad = json.loads(config.read_text(encoding="utf-8")).get("pad_token") or EOS
            pad = pad["content"] if isinstance(pad, dict) else pad
        if vocab.is_file() and merges.is_file():
            return cls.from_files(vocab, merges, pad)
        if fast.is_file():
            return cls.from_tokenizer_json(fast, pad)
        raise FileNotFoundError(f"{folder} has neither vocab.json + merges.txt nor tokenizer.json; expected "
                                "a diffusers folder with a tokenizer/ subfolder")

    # -- the algorithm --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Ids in use: the vocabulary's (49,408) plus the added tokens'."""
        return len(self.encoder) + len(self.added_tokens)

    # -- added tokens (textual inversion) -------------------------------------------------------

    def with_added_tokens(self, tokens: Sequence[str]) -> "CLIPTokenizer":
        """A copy that also knows `tokens`, numbered from `vocab_size` on (49408, 49409, …), as
        transformers' `add_tokens` numbers them. This tokenizer is left as it was (the bundled one
        is shared by every pipeline); the copy shares its vocabulary and merges.

        An added token is found in a prompt *before* the BPE: the cleaned text (lower-cased,
        whitespace collapsed) is cut at every occurrence of the cleaned token, anywhere, even
        inside a word ("a<star>s" → a | <star> | s), longest token first where two start at the
        same place; the text between is split and BPE'd as usual. So "<Star>" and "<star>" are the
        same token, as in transformers (its added tokens are `normalized`).
        """
        tokens = list(tokens)
        for token in tokens:
            if not isinstance(token, str) or not token.strip():
                raise ValueError(f"an added token must be a non-empty string; got {token!r}")
            clash = self._known_as(token)
            if clash or tokens.count(token) > 1:
                raise ValueError(f"cannot add the token {token!r}: {clash or 'it is listed twice'}. Choose "
                                 f"another name (a placeholder such as '<{token.strip('<>')}-2>')")
        new = self._copy()
        new.added_tokens.update({t: self.vocab_size + i for i, t in enumerate(tokens)})
        new._compile_added()
        return new

    def without_added_tokens(self, tokens: Sequence[str] | None = None) -> "CLIPTokenizer":
        """A copy without the added `tokens` (None: without any); the tokens kept are numbered
        again from 49408 on in their order, as diffusers' `unload_textual_inversion` does."""
        drop = set(self.added_tokens if tokens is None else tokens)
        unknown = drop - set(self.added_tokens)
        if unknown:
            raise ValueError(f"not added tokens: {sorted(unknown)}; the added tokens are {list(self.added_tokens)}")
        new = self._copy()
        kept = [t for t in self.added_tokens if t not in drop]
        new.added_tokens = {t: len(self.encoder) + i for i, t in enumerate(kept)}
        new._compile_added()
        return new

    def _known_as(self, token: str) -> str | None:
        """Why `token` cannot be added (None if it can): it is already an added token, a
        vocabulary entry, or a whole word the vocabulary has, which it would silently replace."""
        if token in self.added_tokens or clean(token) in map(clean, self.added_tokens):
            return "it is already an added token"
        if token in self.encoder:
            return f"it is already in the vocabulary (id {self.encoder[token]})"
        pieces = _PIECE.findall(clean(token))
        if len(pieces) == 1 and pieces[0] + WORD_END in self.encoder:
            return (f"it is the word {pieces[0]!r} (id {self.encoder[pieces[0] + WORD_END]}); as an added token it "
                    "would replace that word in every prompt")
        return None

    def _copy(self) -> "CLIPTokenizer":
        new = copy.copy(self)                  # shares encoder, decoder, bpe_ranks: never mutated
        new.added_tokens = dict(self.added_tokens)
        new._cache = {}
        return new

    def _compile_added(self) -> None:
        self._added_ids = {clean(t): i for t, i in self.added_tokens.items()}
        longest_first = sorted(self._added_ids, key=len, reverse=True)
        self._added_pattern = regex.compile("|".join(map(regex.escape, longest_first))) if longest_first else None
        self._added_names = {i: t for t, i in self.added_tokens.items()}

    def _split_added(self, cleaned: str) -> list[str]:
        """Cleaned text → pieces, the added tokens' (cleaned) strings whole, the rest split by CLIP's pattern."""
        if self._added_pattern is None:
            return _PIECE.findall(cleaned)
        out, start = [], 0
        for m in self._added_pattern.finditer(cleaned):
            out += _PIECE.findall(cleaned[start:m.start()]) + [m.group()]
            start = m.end()
        return out + _PIECE.findall(cleaned[start:])

    def pieces(self, text: str) -> list[str]:
        """The pre-tokens of `text`: special literals whole, the rest cleaned and split."""
        text = repair_surrogates(text)
        if "<|" not in text:                  # cleaning never creates "<|"
            return self._split_added(clean(text))
        out = []
        for i, part in enumerate(_SPECIAL.split(text)):
            if i % 2:                         # split() puts the captured exact literals at odd places
                out.append(part)
            else:                             # a literal made by cleaning ("<|EndOfText|>") is text:
                for piece in self._split_added(clean(part)):   # transformers' byte-level step splits it
                    out += _SPELLED_OUT.get(piece, (piece,))
        return out

    def bpe_steps(self, piece: str) -> list[list[str]]:
        """The BPE of one pre-token, merge by merge: [initial symbols, after merge 1, …, final].

        Start from the piece's bytes (as printable symbols), the last one marked with `</w>`.
        Repeat: among adjacent pairs take the one whose merge rule ranks first (learned
        earliest) and join all its occurrences, left to right; stop when no pair has a rule.
        """
        if not piece:
            raise ValueError("bpe_steps needs a non-empty piece of text")
        symbols = [self._byte_encoder[b] for b in repair_surrogates(piece).encode("utf-8")]
        symbols[-1] += WORD_END
        steps = [symbols]
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.bpe_ranks.get(p, _NO_RULE))
            if pair not in self.bpe_ranks:
                break
            symbols = merge_pair(symbols, pair)
            steps.append(symbols)
        return steps

    def _piece_ids(self, piece: str) -> tuple[int, ...]:
        ids = self._cache.get(piece)
        if ids is None:
            if piece in self._special_ids:
                ids = (self._special_ids[piece],)
            elif self._added_pattern is not None and piece in self._added_ids:
                ids = (self._added_ids[piece],)
            else:
                ids = tuple(self.encoder[s] for s in self.bpe_steps(piece)[-1])
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    # -- text → ids → text ----------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        """[start, ids of every piece…], no end token yet."""
        ids, cache = [self.bos_token_id], self._cache
        for piece in self.pieces(text):
            ids += cache.get(piece) or self._piece_ids(piece)    # the cache's hit path, inlined
        return ids

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """text → [start, ids…, end], no padding. With `max_length`, cut to that length keeping
        the end token, and warn naming the dropped words."""
        text = _check_text(text)
        ids = self._ids(text)
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens (≥ 2), got {max_length}")
        if max_length is not None and len(ids) >= max_length:
            ids = self._truncate(text, ids, max_length)
        return ids + [self.eos_token_id]

    def __call__(self, text: str | Sequence[str]) -> torch.Tensor:
        """A prompt or a list of B prompts → LongTensor (B, 77): start, ids, end, padding."""
        texts = [text] if isinstance(text, str) else _check_list(text)
        n = self.model_max_length
        rows = np.full((len(texts), n), self.pad_token_id, dtype=np.int64)
        for b, t in enumerate(texts):
            ids = self.encode(t, max_length=n)
            rows[b, :len(ids)] = ids
        return torch.from_numpy(rows)

    def _truncate(self, text: str, ids: list[int], max_length: int) -> list[int]:
        """Keep [start, the first max_length - 2 ids] and warn naming the words that are cut."""
        kept, count, dropped = max_length - 2, 0, []
        for piece in self.pieces(text):
            count += len(self._piece_ids(piece))
            if count > kept:
                dropped.append(piece)
        warnings.warn(f"the prompt has {count} tokens but CLIP reads {kept} (plus start and end); "
                      f"dropped: {' '.join(dropped)!r}. Shorten the prompt to keep them.", stacklevel=_caller_outside())
        return ids[:max_length - 1]

    def tokenize(self, text: str) -> list[str]:
        """The vocabulary symbols of `text` (without start/end), e.g. ['cat</w>', ',</w>']."""
        return [self._added_names.get(i) or self.decoder[i] for i in self.encode(text)[1:-1]]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str | list[str]:
        """ids → text. Start, end and padding tokens are dropped and each word end `</w>` becomes
        a space, so pieces come back space-separated ("cat ,"). A (B, L) tensor gives B texts."""
        if isinstance(ids, torch.Tensor):
            if ids.ndim == 2:
                return [self.decode(row) for row in ids]
            ids = ids.tolist()
        skip = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        words, symbols = [], []
        for i in ids:
            if i in skip:
                continue
            if i in self._added_names:         # an added token comes back as it was added
                words += [self._bpe_text(symbols), self._added_names[i]]
                symbols = []
            elif i in self.decoder:
                symbols.append(self.decoder[i])
            else:
                raise ValueError(f"token id {i!r} is not in the vocabulary (0 … {self.vocab_size - 1})")
        return " ".join(w for w in words + [self._bpe_text(symbols)] if w)

    def _bpe_text(self, symbols: list[str]) -> str:
        text = bytes(self._byte_decoder[c] for c in "".join(symbols)).decode("utf-8", errors="replace")
        return text.replace(WORD_END, " ").strip()


def _caller_outside() -> int:
    """warnings.warn's stacklevel for the first frame outside this module (the user's call)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"the tokenizer expects a string (or a list of strings), got {type(text).__name__}")
    return repair_surrogates(text)


def _check_list(texts) -> list[str]:
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"the tokenizer expects a string or a list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"the tokenizer expects a list of strings; item {i} is a {type(t).__name__}")
    return list(texts)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> CLIPTokenizer:
    """SD v1.x's tokenizer from the bundled vocabulary, built once per process."""
    return CLIPTokenizer.bundled()
