"""Notebook 01's exercises (sdlearn/exercises/nb01_weights.py): what their references mean on
real files, a learner's answer written as the notebook's solution passes, and each input that
exists only to catch one mistake is really needed."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from sdlearn import checkpoint, exercises, layouts, safetensors_file
from sdlearn.configs import ModelConfig
from sdlearn.exercises import EXERCISES

TINY = Path(safetensors_file.__file__).parent / "data" / "tiny.safetensors"


def test_tensor_location_is_a_byte_range_of_the_whole_file():
    data = TINY.read_bytes()
    f = safetensors_file.SafetensorsFile(TINY)
    for name in f.keys()[:20]:
        n, dtype, shape, (start, end) = EXERCISES["tensor_location"].reference(TINY, name)
        assert struct.unpack("<Q", data[:8]) == (n,) and dtype == f.header.tensors[name].dtype
        assert data[start:end] == f[name].contiguous().view(-1).numpy().tobytes(), name
        assert shape == tuple(f[name].shape)


def test_a_learners_header_reader_passes():
    def tensor_location(path, name):
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            entry = json.loads(fh.read(n))[name]
        begin, end = entry["data_offsets"]
        return n, entry["dtype"], tuple(entry["shape"]), (8 + n + begin, 8 + n + end)
    assert exercises.run_check("tensor_location", tensor_location).passed


def test_tensor_nbytes_is_the_span_of_every_tensor_in_the_bundled_file():
    header = safetensors_file.read_safetensors_header(TINY)
    nbytes = EXERCISES["tensor_nbytes"].reference
    assert all(nbytes(t.dtype, list(t.shape)) == t.end - t.begin for t in header.tensors.values())

    def tensor_nbytes(dtype, shape):
        size = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1}[dtype]
        for s in shape:
            size *= s
        return size
    assert exercises.run_check("tensor_nbytes", tensor_nbytes).passed


def test_sdlearn_key_names_every_original_key_of_sd15():
    sd15 = ModelConfig.sd15()
    reference = EXERCISES["sdlearn_key"].reference
    for component in ("unet", "vae"):
        rules = layouts.block_rules(component, sd15)
        for key in checkpoint.build_empty(component, sd15).state_dict():
            assert reference(layouts.to_original_key(key, rules), rules) == key


def test_the_made_up_rules_are_what_catch_a_prefix_without_its_dot():
    """On SD v1.5's own keys no block name is the start of another's, so matching without the
    dot gives the right names: only the made-up 'blocks.1' / 'blocks.12' input tells."""
    ex = EXERCISES["sdlearn_key"]
    without_dot = ex.mistakes[-1].wrong
    differing = [c.label for c in ex.cases() if without_dot(*c.args) != ex.reference(*c.args)]
    assert len(differing) == 1 and "made-up" in differing[0]
    sd15 = ModelConfig.sd15()
    rules = layouts.block_rules("unet", sd15)
    for key in list(checkpoint.build_empty("unet", sd15).state_dict())[::7]:
        original = layouts.to_original_key(key, rules)
        assert without_dot(original, rules) == key
