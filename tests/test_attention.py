import torch

from sdlearn.attention import AttentionRecorder, attention, attention_probs, recording_paused


def naive_attention(q, k, v, heads, causal=False):
    b, nq, c = q.shape
    d = c // heads
    split = lambda x: x.view(b, -1, heads, d).transpose(1, 2)
    probs = attention_probs(split(q), split(k), causal)
    return (probs @ split(v)).transpose(1, 2).reshape(b, nq, c)


def test_attention_matches_softmax_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 32, generator=g) for n in (10, 7, 7))
    out = attention(q, k, v, heads=4)
    assert out.shape == (2, 10, 32)
    torch.testing.assert_close(out, naive_attention(q, k, v, 4), rtol=1e-5, atol=1e-5)


def test_causal_attention_ignores_the_future():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 6, 16, generator=g) for _ in range(3))
    out = attention(q, k, v, heads=2, causal=True)
    torch.testing.assert_close(out, naive_attention(q, k, v, 2, causal=True), rtol=1e-5, atol=1e-5)
    # Changing the last token must not change the earlier outputs.
    k2, v2 = k.clone(), v.clone()
    k2[:, -1] += 5
    v2[:, -1] -= 3
    out2 = attention(q, k2, v2, heads=2, causal=True)
    torch.testing.assert_close(out[:, :-1], out2[:, :-1])
    assert not torch.allclose(out[:, -1], out2[:, -1])


def test_recorder_keeps_output_identical_and_rows_sum_to_one():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 9, 24, generator=g), torch.randn(2, 5, 24, generator=g), torch.randn(2, 5, 24, generator=g)
    plain = attention(q, k, v, heads=3, tag="layer.attn2")
    with AttentionRecorder(lambda tag: tag.endswith("attn2")) as rec:
        recorded = attention(q, k, v, heads=3, tag="layer.attn2")
        attention(q, k, v, heads=3, tag="layer.attn1")   # not selected
        attention(q, k, v, heads=3)                      # untagged: never recorded
    assert torch.equal(plain, recorded)
    assert list(rec.maps) == ["layer.attn2"]
    (probs,) = rec.maps["layer.attn2"]
    assert probs.shape == (2, 3, 9, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 9))
    # Outside the `with` block nothing is recorded any more.
    attention(q, k, v, heads=3, tag="layer.attn2")
    assert len(rec.maps["layer.attn2"]) == 1


def test_recording_paused_hides_the_calls_inside_it_from_every_recorder():
    q = k = v = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(3))
    with AttentionRecorder() as outer:
        with recording_paused():
            attention(q, k, v, heads=2, tag="bookkeeping")
            with AttentionRecorder() as inner:                # a recorder opened inside still records
                attention(q, k, v, heads=2, tag="inside")
        attention(q, k, v, heads=2, tag="after")              # and the outer one resumes
    assert list(outer.maps) == ["after"] and list(inner.maps) == ["inside"]


def test_recorder_with_to_cpu_false_keeps_the_maps_on_the_models_device():
    # The meta device stands in for a GPU: a map copied to the CPU from there would raise.
    q, k, v = (torch.empty(1, 4, 8, device="meta") for _ in range(3))
    with AttentionRecorder(to_cpu=False) as rec:
        attention(q, k, v, heads=2, tag="layer.attn2")
    (probs,) = rec.maps["layer.attn2"]
    assert probs.is_meta and probs.shape == (1, 2, 4, 4)
