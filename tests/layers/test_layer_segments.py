"""`segment_ids` in `Aaren` and `AarenBlock`: sequences packed in one row give each sequence the
outputs, final state and gradients it gives alone, for every method and with masks.

The reference is the same layer called on each sequence by itself, with no segments: that path
is tested against the naive attention and the stepped cell in test_aaren.py and
test_aaren_block.py, and shares no segment logic with the packed call.
"""

import keras
import numpy as np
import pytest
from helpers import FEATURES, assert_close, gradients, to_numpy

from keras_aaren import Aaren, AarenBlock
from keras_aaren.ops import METHODS

# Awkward lengths: a single token, segments across the 16-token chunk border, one that fills a
# chunk exactly.
LENGTHS = {"L5-1-9-3": [5, 1, 9, 3], "L16-1-20": [16, 1, 20], "L1-1-1": [1, 1, 1]}


def make_layer(kind, **kwargs):
    if kind == "aaren":
        return Aaren(2, 4, return_sequences=True, **kwargs)
    norm_first = kind == "block-prenorm"
    return AarenBlock(
        2, 4, ffn_dim=8, dropout=0.0, norm_first=norm_first, return_sequences=True, **kwargs
    )


def pack(lengths, seed=0, masked=()):
    """One row holding sequences of `lengths`, their ids (from 1), and a mask with `masked`
    (positions within the row) False."""
    rng = np.random.default_rng(seed)
    sequences = [rng.normal(size=(n, FEATURES)).astype("float32") for n in lengths]
    ids = np.concatenate([np.full(n, i + 1, "int32") for i, n in enumerate(lengths)])
    mask = np.ones(sum(lengths), bool)
    mask[list(masked)] = False
    return sequences, np.concatenate(sequences)[None], ids[None], mask[None]


def split(row, lengths):
    return np.split(row[0], np.cumsum(lengths)[:-1])


# Every method for the Aaren layer; the blocks add per-token parts only, so "auto" suffices
# for them (tests/ops/test_segments.py covers every method of the scan itself).
CASES = [("aaren", method) for method in METHODS] + [
    ("block", "auto"),
    ("block-prenorm", "auto"),
]


@pytest.mark.parametrize("kind, method", CASES, ids=[f"{k}-{m}" for k, m in CASES])
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
def test_packed_row_equals_each_sequence_alone(kind, method, lengths):
    layer = make_layer(kind, method=method)
    sequences, row, ids, _ = pack(lengths)
    packed = split(to_numpy(layer(row, segment_ids=ids)), lengths)
    for sequence, got in zip(sequences, packed):
        assert_close(got, to_numpy(layer(sequence[None]))[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["aaren", "block"])
@pytest.mark.parametrize("masked", [(0,), (5,), (5, 6), (4, 5), (17,)], ids=str)
def test_masks_inside_segments(kind, masked):
    # A masked token first in a segment (5: the third segment's first), last in one (4), a
    # whole one-token segment (5 of L5-1-9-3 is the second segment), and the row's last token.
    lengths = [5, 1, 9, 3]
    layer = make_layer(kind)
    sequences, row, ids, mask = pack(lengths, seed=1, masked=masked)
    outputs = layer(row, mask=mask, segment_ids=ids)
    layer_with_state = make_layer(kind, return_state=True)
    layer_with_state.build(row.shape)
    layer_with_state.set_weights(layer.get_weights())
    _, y, c = layer_with_state(row, mask=mask, segment_ids=ids)
    for sequence, got, alone_mask in zip(
        sequences, split(to_numpy(outputs), lengths), split(mask, lengths)
    ):
        want = layer(sequence[None], mask=alone_mask[None])
        assert_close(got, to_numpy(want)[0], atol=1e-5, rtol=1e-5)
    # The final state is the last sequence's, as if it had been alone.
    _, want_y, want_c = layer_with_state(sequences[-1][None], mask=split(mask, lengths)[-1][None])
    assert_close(to_numpy(y), to_numpy(want_y), atol=1e-5, rtol=1e-5)
    assert_close(to_numpy(c), to_numpy(want_c), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["aaren", "block"])
def test_initial_state_seeds_the_first_segment_only(kind):
    lengths = [4, 6]
    layer = make_layer(kind, return_state=True)
    sequences, row, ids, _ = pack(lengths, seed=2)
    layer.build(row.shape)
    # A state reached by a real sequence, so that seeding it shows in the outputs.
    _, *state = layer(np.random.default_rng(3).normal(size=(1, 7, FEATURES)).astype("float32"))
    outputs, y, c = layer(row, initial_state=state, segment_ids=ids)
    first, second = split(to_numpy(outputs), lengths)
    seeded, _, _ = layer(sequences[0][None], initial_state=state)
    fresh, want_y, want_c = layer(sequences[1][None])
    assert_close(first, to_numpy(seeded)[0], atol=1e-5, rtol=1e-5)
    assert_close(second, to_numpy(fresh)[0], atol=1e-5, rtol=1e-5)
    assert_close(to_numpy(y), to_numpy(want_y), atol=1e-5, rtol=1e-5)
    assert_close(to_numpy(c), to_numpy(want_c), atol=1e-5, rtol=1e-5)


def test_go_backwards_runs_each_segment_backwards():
    lengths = [5, 1, 9, 3]
    layer = Aaren(2, 4, return_sequences=True, go_backwards=True)
    sequences, row, ids, _ = pack(lengths, seed=4)
    # go_backwards returns the outputs in the order it computed them: the row's last token first.
    got = split(to_numpy(layer(row, segment_ids=ids))[:, ::-1], lengths)
    for sequence, packed in zip(sequences, got):
        assert_close(packed[::-1], to_numpy(layer(sequence[None]))[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["aaren", "block"])
def test_gradients_are_the_sum_over_sequences_alone(kind):
    lengths = [5, 1, 9, 3]
    layer = make_layer(kind)
    sequences, row, ids, _ = pack(lengths, seed=5)
    layer.build(row.shape)
    weights = [to_numpy(v) for v in layer.trainable_variables]
    # A block's dropout seed; dropout is 0, so it is never used.
    fixed = [v.value for v in layer.non_trainable_variables]
    target = np.random.default_rng(6).normal(size=(1, sum(lengths), FEATURES)).astype("float32")

    def loss(x, *trainable, ids=None, target=target):
        segment_ids = None if ids is None else keras.ops.convert_to_tensor(ids)
        outputs, _ = layer.stateless_call(list(trainable), fixed, x, segment_ids=segment_ids)
        return keras.ops.sum(keras.ops.multiply(outputs, target))

    got = gradients(lambda x, *w: loss(x, *w, ids=ids), [row, *weights])
    starts = np.cumsum([0, *lengths])
    want = [np.zeros_like(w) for w in weights]
    want_x = []
    for sequence, begin, end in zip(sequences, starts[:-1], starts[1:]):
        alone = gradients(
            lambda x, *w, b=begin, e=end: loss(x, *w, target=target[:, b:e]),
            [sequence[None], *weights],
        )
        want_x.append(alone[0][0])
        want = [total + g for total, g in zip(want, alone[1:])]
    assert_close(got[0][0], np.concatenate(want_x), atol=1e-4, rtol=1e-4, what="inputs")
    names = [v.path for v in layer.trainable_variables]
    for name, g, w in zip(names, got[1:], want):
        # The key bias adds the same b_k . q to every score, which softmax cancels: its gradient
        # is zero up to rounding. Every other weight must receive one.
        if "key_bias" not in name:
            assert np.any(g != 0), name
        assert_close(g, w, atol=1e-4, rtol=1e-4, what=name)


def test_functional_model_with_packed_rows_trains():
    tokens = keras.Input((None, FEATURES))
    segment_ids = keras.Input((None,), dtype="int32")
    x = AarenBlock(2, 4, ffn_dim=8, return_sequences=True)(tokens, segment_ids=segment_ids)
    outputs = Aaren(2, 4, return_sequences=True)(x, segment_ids=segment_ids)
    model = keras.Model([tokens, segment_ids], outputs)
    model.compile("sgd", "mse")
    _, row, ids, _ = pack([5, 1, 9, 3], seed=7)
    history = model.fit([row, ids], np.zeros((1, 18, FEATURES), "float32"), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert model.predict([row, ids], verbose=0).shape == (1, 18, FEATURES)


@pytest.mark.parametrize(
    "segment_ids, match",
    [
        (np.zeros((1, 6), "float32"), r"`segment_ids` must be integers.*float32"),
        (np.zeros((1, 5), "int32"), r"`segment_ids` must have shape.*\(1, 6\).*\(1, 5\)"),
        (np.zeros((6,), "int32"), r"`segment_ids` must have shape"),
    ],
    ids=["float", "short", "rank-1"],
)
def test_bad_segment_ids_raise(segment_ids, match):
    x = np.zeros((1, 6, FEATURES), "float32")
    with pytest.raises(ValueError, match=match):
        Aaren(2, 4)(x, segment_ids=segment_ids)
