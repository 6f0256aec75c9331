"""Packing: pack_sequences / unpack_sequences round trips, the layout of the rows, bad input, the
PyDataset, and a model on packed rows against the same model on each sequence alone."""

import keras
import numpy as np
import pytest

from keras_aaren import Aaren, PackedRows, PackedSequences, pack_sequences, unpack_sequences

FEATURES = 3

# Lengths that stress the packing: one token, a row exactly full, many short, one long among
# short ones, and an irregular mix (row_length 8 in every case).
LENGTHS = {
    "one-token": [1],
    "exactly-row-length": [8, 8, 8],
    "many-short": [1, 2, 1, 3, 2, 1, 1, 2, 3, 1, 1, 2],
    "one-long-many-short": [2, 1, 8, 3, 1, 2],
    "irregular": [5, 3, 7, 1, 6, 2, 4, 8, 3, 5],
}
ROW_LENGTH = 8


def labelled_sequences(lengths):
    """Sequences whose tokens say where they come from: (sequence index + 1, position, 1)."""
    return [
        np.stack([np.full(n, i + 1.0), np.arange(n, dtype=float), np.ones(n)], axis=1).astype(
            "float32"
        )
        for i, n in enumerate(lengths)
    ]


def random_sequences(lengths, seed=0, features=FEATURES):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, features)).astype("float32") for n in lengths]


@pytest.fixture(params=sorted(LENGTHS), ids=sorted(LENGTHS))
def lengths(request):
    return LENGTHS[request.param]


def test_round_trip_returns_every_sequence_in_order(lengths):
    sequences = random_sequences(lengths)
    packed = pack_sequences(sequences, ROW_LENGTH)
    unpacked = unpack_sequences(packed.inputs, packed)
    assert len(unpacked) == len(sequences)
    for got, expected in zip(unpacked, sequences):
        np.testing.assert_array_equal(got, expected)


def test_every_real_token_kept_once_and_padding_is_empty(lengths):
    packed = pack_sequences(labelled_sequences(lengths), ROW_LENGTH)
    real = packed.segment_ids > 0
    # Each (sequence, position) pair appears exactly once among the real tokens.
    tokens = packed.inputs[real][:, :2].astype(int)
    expected = [(i + 1, p) for i, n in enumerate(lengths) for p in range(n)]
    assert sorted(map(tuple, tokens.tolist())) == expected
    assert real.sum() == sum(lengths)
    # Padding: segment 0, weight 0, zero inputs and position 0.
    assert np.all(packed.sample_weight[~real] == 0)
    assert np.all(packed.sample_weight[real] == 1)
    assert np.all(packed.inputs[~real] == 0)
    assert np.all(packed.positions[~real] == 0)


def test_rows_hold_consecutive_segments_then_padding(lengths):
    packed = pack_sequences(labelled_sequences(lengths), ROW_LENGTH)
    assert packed.segment_ids.dtype == np.int32 and packed.positions.dtype == np.int32
    assert packed.sample_weight.dtype == np.float32
    for row, source in zip(packed.segment_ids, packed.inputs[..., 0]):
        real = row[row > 0]
        # Padding only after the real tokens; ids 1..k in runs, each run one sequence.
        assert np.all(row[len(real) :] == 0)
        runs = np.flatnonzero(np.diff(np.concatenate([[0], real])) != 0)
        assert real[runs].tolist() == list(range(1, len(runs) + 1))
        assert np.all(np.diff(real) >= 0)
        for segment in range(1, len(runs) + 1):
            assert len(set(source[row == segment].tolist())) == 1


def test_positions_count_from_zero_in_each_sequence(lengths):
    packed = pack_sequences(labelled_sequences(lengths), ROW_LENGTH)
    real = packed.segment_ids > 0
    # The second feature of each token is its position in its own sequence.
    np.testing.assert_array_equal(packed.positions[real], packed.inputs[real][:, 1])
    for positions, length in zip(unpack_sequences(packed.positions, packed), lengths):
        assert positions.tolist() == list(range(length))


def test_placement_is_first_fit_decreasing_and_deterministic():
    lengths = [2, 5, 3, 6, 4, 1, 3]
    packed = pack_sequences(random_sequences(lengths), 8)
    # Longest first, each into the first row with room: 6 2 | 5 3 | 4 3 1; inside a row, the
    # sequences in the order given: 2 6 | 5 3 | 4 1 3.
    assert packed.sequence_rows.tolist() == [0, 1, 1, 0, 2, 2, 2]
    assert packed.sequence_starts.tolist() == [0, 0, 5, 2, 0, 4, 5]
    assert packed.sequence_lengths.tolist() == lengths
    again = pack_sequences(random_sequences(lengths), 8)
    np.testing.assert_array_equal(packed.segment_ids, again.segment_ids)
    np.testing.assert_array_equal(packed.inputs, again.inputs)


def test_packs_a_many_sequences_set_densely():
    lengths = np.random.default_rng(1).integers(1, 65, size=20_000)
    packed = pack_sequences([np.zeros((n, 1), "float32") for n in lengths], 128)
    # Within one row of the lower bound total / row_length on this set.
    assert packed.num_rows <= -(-lengths.sum() // 128) + 1
    assert packed.num_sequences == len(lengths)


def test_token_targets_are_packed_beside_their_tokens(lengths):
    sequences = labelled_sequences(lengths)
    targets = [np.arange(len(s))[:, None] * 10 + i for i, s in enumerate(sequences)]
    packed = pack_sequences(sequences, ROW_LENGTH, targets=targets)
    assert packed.y.shape == (packed.num_rows, ROW_LENGTH, 1)
    assert packed.y.dtype == targets[0].dtype
    for got, expected in zip(unpack_sequences(packed.y, packed), targets):
        np.testing.assert_array_equal(got, expected)
    assert np.all(packed.y[packed.segment_ids == 0] == 0)


def test_sequence_targets_sit_on_last_tokens(lengths):
    sequences = labelled_sequences(lengths)
    targets = np.arange(len(sequences)) + 100  # one label per sequence
    packed = pack_sequences(sequences, ROW_LENGTH, targets=targets, targets_per="sequence")
    assert packed.y.shape == (packed.num_rows, ROW_LENGTH)
    np.testing.assert_array_equal(unpack_sequences(packed.y, packed, last_token=True), targets)
    # Weight 1 on each sequence's last token, 0 elsewhere.
    assert packed.sample_weight.sum() == len(sequences)
    last_inputs = unpack_sequences(packed.inputs, packed, last_token=True)
    np.testing.assert_array_equal(last_inputs[:, 1], np.asarray(lengths) - 1)
    weighted = packed.sample_weight > 0
    np.testing.assert_array_equal(packed.y[~weighted], 0)


def test_without_targets_y_is_none_and_x_is_the_model_dict():
    packed = pack_sequences(random_sequences([3, 2]), 5)
    assert packed.y is None
    assert set(packed.x) == {"inputs", "segment_ids"}
    assert packed.x["segment_ids"] is packed.segment_ids
    assert isinstance(packed, PackedRows)


def test_accepts_numpy_integer_row_length_and_a_3d_array_of_sequences():
    sequences = np.ones((4, 3, 2), "float32")
    packed = pack_sequences(sequences, np.int64(6))
    assert packed.num_rows == 2 and packed.row_length == 6


BAD_INPUT = {
    "row-length-zero": (dict(row_length=0), r"`row_length` must be a positive integer.*=0"),
    "row-length-negative": (dict(row_length=-4), r"`row_length`.*row_length=-4"),
    "row-length-float": (dict(row_length=4.0), r"`row_length`.*row_length=4.0"),
    "sequence-too-long": (
        dict(sequences=[np.ones((3, 2)), np.ones((9, 2))]),
        r"`row_length` \(8\).*sequences\[1\]\.shape=\(9, 2\)",
    ),
    "empty-list": (dict(sequences=[]), r"`sequences` must hold at least one sequence"),
    "ragged-features": (
        dict(sequences=[np.ones((3, 2)), np.ones((2, 3))]),
        r"same number of features.*sequences\[1\]\.shape=\(2, 3\)",
    ),
    "sequence-1d": (
        dict(sequences=[np.ones((3, 2)), np.ones(4)]),
        r"\(length, features\).*sequences\[1\]\.shape=\(4,\)",
    ),
    "sequence-3d": (
        dict(sequences=[np.ones((3, 2, 1))]),
        r"\(length, features\).*sequences\[0\]\.shape=\(3, 2, 1\)",
    ),
    "one-2d-array": (dict(sequences=np.ones((3, 2))), r"wrap a single sequence in a list"),
    "empty-sequence": (
        dict(sequences=[np.ones((3, 2)), np.ones((0, 2))]),
        r"at least one token.*sequences\[1\]\.shape=\(0, 2\)",
    ),
    "too-few-targets": (
        dict(targets=[np.ones(3)]),
        r"one entry per sequence: 2 sequences.*len\(targets\)=1",
    ),
    "target-length-mismatch": (
        dict(targets=[np.ones(3), np.ones(4)]),
        r"targets\[1\] must have one target per token.*\(2, \.\.\.\).*targets\[1\]\.shape=\(4,\)",
    ),
    "ragged-target-shapes": (
        dict(targets=[np.ones((3, 1)), np.ones((2, 2))]),
        r"same \(length, \*target_shape\).*targets\[1\]\.shape=\(2, 2\)",
    ),
    "ragged-sequence-targets": (
        dict(targets=[np.ones(2), np.ones(3)], targets_per="sequence"),
        r"same target_shape.*targets\[1\]\.shape=\(3,\)",
    ),
    "unknown-targets-per": (
        dict(targets=[np.ones(3), np.ones(2)], targets_per="row"),
        r"`targets_per` must be one of \('token', 'sequence'\).*targets_per='row'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT), ids=sorted(BAD_INPUT))
def test_bad_input_is_refused_by_name(case):
    overrides, message = BAD_INPUT[case]
    arguments = dict(sequences=[np.ones((3, 2)), np.ones((2, 2))], row_length=8)
    arguments.update(overrides)
    with pytest.raises(ValueError, match=message):
        pack_sequences(**arguments)


def test_unpack_refuses_outputs_of_other_rows():
    packed = pack_sequences(random_sequences([3, 2, 4]), 5)
    with pytest.raises(ValueError, match=r"`outputs` must have shape.*outputs\.shape=\(2, 4, 1\)"):
        unpack_sequences(np.zeros((2, 4, 1)), packed)
    with pytest.raises(ValueError, match=r"`packed` must be the PackedRows.*packed=dict"):
        unpack_sequences(np.zeros((2, 5, 1)), packed.x)


def test_dataset_serves_every_row_once_per_epoch_in_a_new_order():
    lengths = LENGTHS["irregular"] * 3
    targets = [np.full((n, 1), i, "float32") for i, n in enumerate(lengths)]
    dataset = PackedSequences(
        labelled_sequences(lengths), ROW_LENGTH, targets, batch_size=4, seed=3
    )
    rows = dataset.packed.num_rows
    assert len(dataset) == -(-rows // 4)

    def epoch():
        batches = [dataset[i] for i in range(len(dataset))]
        x = np.concatenate([b[0]["inputs"] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        weight = np.concatenate([b[2] for b in batches])
        return x, y, weight

    orders = []
    for _ in range(3):
        x, y, weight = epoch()
        assert len(x) == rows and len(dataset) == -(-rows // 4)
        # The same rows, in some order: each row of the packing appears once.
        packed_rows = dataset.packed.inputs
        order = [int(np.flatnonzero((packed_rows == row).all(axis=(1, 2)))[0]) for row in x]
        assert sorted(order) == list(range(rows))
        np.testing.assert_array_equal(y, dataset.packed.y[order])
        np.testing.assert_array_equal(weight, dataset.packed.sample_weight[order])
        orders.append(order)
        dataset.on_epoch_end()
    assert orders[0] != orders[1] != orders[2]
    again = PackedSequences(labelled_sequences(lengths), ROW_LENGTH, targets, batch_size=4, seed=3)
    assert np.all(again[0][0]["inputs"] == dataset.packed.inputs[orders[0][:4]])


def test_dataset_without_shuffle_or_targets_serves_rows_in_order():
    dataset = PackedSequences(random_sequences([3, 5, 4]), 6, batch_size=2, shuffle=False)
    first = dataset[0]
    assert isinstance(first, dict)
    np.testing.assert_array_equal(first["segment_ids"], dataset.packed.segment_ids[:2])
    last = dataset[len(dataset) - 1]["inputs"]
    assert len(last) == dataset.packed.num_rows - 2 * (len(dataset) - 1)
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer.*=0"):
        PackedSequences(random_sequences([3]), 6, batch_size=0)


# Model level: needs `segment_ids` in the layers' call.


def packed_model(features=FEATURES):
    """Dense -> Aaren -> Dense over packed rows, and the same layers for one sequence alone."""
    dense_in = keras.layers.Dense(8)
    aaren = Aaren(2, 4, return_sequences=True)
    dense_out = keras.layers.Dense(2)
    inputs = keras.Input((None, features), name="inputs")
    segment_ids = keras.Input((None,), dtype="int32", name="segment_ids")
    outputs = dense_out(aaren(dense_in(inputs), segment_ids=segment_ids))
    model = keras.Model({"inputs": inputs, "segment_ids": segment_ids}, outputs)

    def alone(sequence):
        # No segment ids: the layers on one sequence, an independent computation.
        return keras.ops.convert_to_numpy(dense_out(aaren(dense_in(sequence[None]))))[0]

    return model, alone


def test_each_sequence_gets_the_outputs_it_gets_alone():
    # Few distinct lengths: on JAX each one compiles the layers for the sequences alone.
    lengths = [1, 8, 3, 5, 3, 1, 8, 5, 3]
    sequences = random_sequences(lengths, seed=4)
    packed = pack_sequences(sequences, ROW_LENGTH)
    assert packed.num_rows < len(lengths)  # rows do hold several sequences
    model, alone = packed_model()
    outputs = model.predict(packed.x, verbose=0)
    for got, sequence in zip(unpack_sequences(outputs, packed), sequences):
        np.testing.assert_allclose(got, alone(sequence), atol=1e-5, rtol=1e-5)
    last = unpack_sequences(outputs, packed, last_token=True)
    np.testing.assert_allclose(last, [alone(s)[-1] for s in sequences], atol=1e-5, rtol=1e-5)


def training_set():
    lengths = LENGTHS["irregular"]
    sequences = random_sequences(lengths, seed=5)
    targets = random_sequences(lengths, seed=6, features=2)
    return sequences, targets


@pytest.fixture(scope="module")
def compiled_model():
    # One model for the three fit tests: their batches have the same shapes, so the training
    # step compiles once.
    model, _ = packed_model()
    model.compile(optimizer="adam", loss="mse")
    return model


def test_fit_on_numpy_arrays(compiled_model):
    sequences, targets = training_set()
    packed = pack_sequences(sequences, ROW_LENGTH, targets)
    history = compiled_model.fit(
        packed.x, packed.y, sample_weight=packed.sample_weight, batch_size=4, epochs=1, verbose=0
    )
    assert np.isfinite(history.history["loss"][0])


# Keras 3.15 warns that fit's default shuffle=True does not reach a tf.data.Dataset.
@pytest.mark.filterwarnings("ignore:`shuffle=True` was passed")
def test_fit_on_a_tf_data_dataset(compiled_model):
    tf = pytest.importorskip("tensorflow")
    sequences, targets = training_set()
    packed = pack_sequences(sequences, ROW_LENGTH, targets)
    dataset = tf.data.Dataset.from_tensor_slices((packed.x, packed.y, packed.sample_weight))
    history = compiled_model.fit(dataset.shuffle(16, seed=0).batch(4), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_fit_on_the_py_dataset_with_sequence_targets(compiled_model):
    sequences, _ = training_set()
    labels = np.random.default_rng(7).normal(size=(len(sequences), 2)).astype("float32")
    dataset = PackedSequences(
        sequences, ROW_LENGTH, labels, targets_per="sequence", batch_size=4, seed=0
    )
    history = compiled_model.fit(dataset, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
