"""Packing: many variable-length sequences in rows of one length, apart by their segment ids.

A batch padded to its longest sequence spends compute on padding; packed, several sequences share
one row and `segment_ids` keep them apart: Aaren's scan starts again from "nothing seen" at each
sequence's first token, so a sequence's outputs are those it gives alone. Three public names:

* `pack_sequences(sequences, row_length, targets=None)` packs NumPy arrays into `PackedRows`,
  NumPy arrays ready for `model.fit` (or `tf.data.Dataset.from_tensor_slices`).
* `unpack_sequences(outputs, packed)` returns a model's packed outputs per sequence, in the order
  the sequences were given.
* `PackedSequences` is a `keras.utils.PyDataset` of packed rows in batches, shuffled each epoch.

In a row, real sequences have segment ids 1, 2, ... in order and the padding at the row's end has
id 0, a segment of its own, so a sequence never shares a segment with padding or with another
sequence.
"""

import dataclasses
import numbers

import keras
import numpy as np

from keras_aaren.validation import check_positive_int

__all__ = ["pack_sequences", "unpack_sequences", "PackedRows", "PackedSequences"]

TARGETS_PER = ("token", "sequence")


@dataclasses.dataclass(frozen=True, eq=False)
class PackedRows:
    """Sequences packed in rows of one length: the arrays `model.fit` takes, and where each went.

    Made by `pack_sequences`; `unpack_sequences` reads the placement back. All arrays are NumPy.
    `x`, `y` and `sample_weight` are the three arguments of `model.fit` for a model whose inputs
    are the dict `{"inputs": ..., "segment_ids": ...}`.

    Args:
        inputs: `(rows, row_length, features)`, the sequences' tokens; zeros where a row is padded.
        segment_ids: int32 `(rows, row_length)`: 1, 2, ... for the sequences of a row in order,
            0 for the padding at its end.
        positions: int32 `(rows, row_length)`: each token's position in its own sequence
            (0 for the first), for positional embeddings; 0 on padding.
        sample_weight: float32 `(rows, row_length)`: 1 where a token carries a target (every real
            token, or the last token of each sequence with `targets_per="sequence"`), else 0.
        targets: `(rows, row_length, *target_shape)` in the targets' dtype, zeros where
            `sample_weight` is 0; `None` when no targets were given.
        sequence_rows: int64 `(num_sequences,)`: the row of each sequence, in the given order.
        sequence_starts: int64 `(num_sequences,)`: the column of each sequence's first token.
        sequence_lengths: int64 `(num_sequences,)`: the number of tokens of each sequence.

    Its properties: `x`, the dict `{"inputs": inputs, "segment_ids": segment_ids}`; `y`, the
    targets; `num_rows`, `row_length` and `num_sequences`. A model that also reads positions
    takes `{**packed.x, "positions": packed.positions}`.

    Examples:
        >>> import numpy as np
        >>> packed = pack_sequences([np.ones((3, 2)), np.ones((1, 2))], row_length=4)
        >>> packed.segment_ids
        array([[1, 1, 1, 2]], dtype=int32)
        >>> sorted(packed.x)
        ['inputs', 'segment_ids']
    """

    inputs: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    sample_weight: np.ndarray
    targets: np.ndarray | None
    sequence_rows: np.ndarray
    sequence_starts: np.ndarray
    sequence_lengths: np.ndarray

    @property
    def x(self):
        """The model's inputs: `{"inputs": inputs, "segment_ids": segment_ids}`."""
        return {"inputs": self.inputs, "segment_ids": self.segment_ids}

    @property
    def y(self):
        """The packed targets (`None` without targets)."""
        return self.targets

    @property
    def num_rows(self):
        return self.segment_ids.shape[0]

    @property
    def row_length(self):
        return self.segment_ids.shape[1]

    @property
    def num_sequences(self):
        return self.sequence_lengths.shape[0]


def _check_length(name, value):
    # A length computed with NumPy (`lengths.max()`) is a NumPy integer: take it as the int it is.
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    check_positive_int(name, value)
    return value


def _as_sequences(sequences):
    """The sequences as a list of 2D arrays of one feature width; a ValueError names a bad one."""
    if isinstance(sequences, np.ndarray) and sequences.ndim == 2:
        raise ValueError(
            "`sequences` must be a list of arrays of shape (length, features), one per sequence. "
            f"Received: one array of shape sequences.shape={sequences.shape}; wrap a single "
            "sequence in a list"
        )
    try:
        sequences = list(sequences)
    except TypeError:
        raise ValueError(
            "`sequences` must be a list of arrays of shape (length, features). "
            f"Received: sequences={sequences!r}"
        ) from None
    if not sequences:
        raise ValueError(
            "`sequences` must hold at least one sequence. Received: sequences=[] (empty)"
        )
    arrays = []
    for i, sequence in enumerate(sequences):
        array = np.asarray(sequence)
        if array.ndim != 2:
            raise ValueError(
                f"Each of `sequences` must have shape (length, features). "
                f"Received: sequences[{i}].shape={array.shape}"
            )
        if array.shape[0] == 0:
            # An empty sequence has no token to place and, with a per-sequence target, no last
            # token to carry it: refused rather than dropped.
            raise ValueError(
                f"Each of `sequences` must hold at least one token (length >= 1). "
                f"Received: sequences[{i}].shape={array.shape}"
            )
        if arrays and array.shape[1] != arrays[0].shape[1]:
            raise ValueError(
                f"All of `sequences` must have the same number of features (axis 1), that of "
                f"sequences[0], {arrays[0].shape[1]}. Received: sequences[{i}].shape={array.shape}"
            )
        arrays.append(array)
    return arrays


def _as_targets(targets, lengths, targets_per):
    """The targets as a list of arrays (one per sequence) of one trailing shape, checked."""
    if targets_per not in TARGETS_PER:
        raise ValueError(
            f"`targets_per` must be one of {TARGETS_PER}. Received: targets_per={targets_per!r}"
        )
    count = len(lengths)
    try:
        targets = list(targets)
    except TypeError:
        raise ValueError(
            f"`targets` must be a list with one entry per sequence ({count}). "
            f"Received: targets={targets!r}"
        ) from None
    if len(targets) != count:
        raise ValueError(
            f"`targets` must have one entry per sequence: {count} sequences. "
            f"Received: len(targets)={len(targets)}"
        )
    arrays = [np.asarray(target) for target in targets]
    if targets_per == "token":
        for i, (target, length) in enumerate(zip(arrays, lengths)):
            if target.ndim == 0 or target.shape[0] != length:
                raise ValueError(
                    f"With targets_per='token', targets[{i}] must have one target per token of "
                    f"sequences[{i}]: shape ({length}, ...). Received: "
                    f"targets[{i}].shape={target.shape}"
                )
        trailing = [target.shape[1:] for target in arrays]
        layout = "(length, *target_shape)"
    else:
        trailing = [target.shape for target in arrays]
        layout = "target_shape"
    for i, shape in enumerate(trailing):
        if shape != trailing[0]:
            raise ValueError(
                f"All of `targets` must have the same {layout}, that of targets[0], "
                f"{trailing[0]}. Received: targets[{i}].shape={arrays[i].shape}"
            )
    return arrays, trailing[0]


def _first_fit_decreasing(lengths, capacity):
    """The row of each length: first-fit decreasing, deterministic (ties keep the given order).

    Each sequence, longest first, goes to the first row with room for it. A max-tree over the
    rows' free room finds that row in O(log n), so packing a million sequences takes seconds.
    There are never more rows than sequences, so the tree has one leaf per sequence, all free at
    first; the first fit opens rows from the left, so the rows used are 0, 1, ... without gaps.
    """
    count = len(lengths)
    size = 1
    while size < count:
        size *= 2
    free = [capacity] * (2 * size)
    rows = [0] * count
    for i in np.argsort(-np.asarray(lengths), kind="stable").tolist():
        length = lengths[i]
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        rows[i] = node - size
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return np.asarray(rows, dtype=np.int64)


def pack_sequences(sequences, row_length, targets=None, targets_per="token"):
    """Packs variable-length sequences into rows of `row_length` tokens, with their segment ids.

    Padding every sequence to the longest spends compute on padding; packed, several sequences
    share a row and `segment_ids` keep them apart (`Aaren(...)(x, segment_ids=...)`,
    `AarenBlock(...)(x, segment_ids=...)`): each sequence's outputs are those it gives alone.
    Use it when sequences vary in length, to train with `model.fit` on NumPy arrays or a
    `tf.data.Dataset` built from them (`PackedSequences` shuffles rows per epoch instead), and
    `unpack_sequences` to read a model's packed outputs back per sequence.

    Rows are filled by first-fit decreasing: longest sequence first, each into the first row with
    room. It needs at most 11/9 of the rows of the best packing plus one, runs in O(n log n),
    and is deterministic (equal lengths keep the given order). Inside a row, sequences keep the
    given order and take segment ids 1, 2, ...; the padding after them has segment id 0, a
    segment of its own, so it never joins a real sequence, and weight 0. Per-token layers
    (`Dense`, normalization over features) need nothing: only the recurrent layers read
    `segment_ids`.

    Targets come in one of two forms (`targets_per`): `"token"`, one target per token (a
    sequence labelling or forecasting model with `return_sequences=True`), or `"sequence"`, one
    target per sequence, placed on the sequence's last token, whose output has seen all of it;
    `sample_weight` is then 1 on last tokens only, so a per-token loss trains exactly the
    per-sequence predictions.

    Args:
        sequences: list of arrays of shape `(length_i, features)`, `1 <= length_i <= row_length`,
            all with the same `features`.
        row_length: int, the number of tokens in a row, at least the longest sequence.
        targets: optional list with one entry per sequence: arrays `(length_i, *target_shape)`
            with `targets_per="token"`, arrays (or scalars) of one `target_shape` with
            `targets_per="sequence"`; an array whose first axis is the sequence also works.
        targets_per: `"token"` (default) or `"sequence"`, the form of `targets` (see above).

    Returns:
        A `PackedRows`: `inputs` `(rows, row_length, features)`, `segment_ids` and `positions`
        (int32, `(rows, row_length)`), `sample_weight` (float32, `(rows, row_length)`), `targets`
        `(rows, row_length, *target_shape)` or `None`, and the placement of each sequence; `x` is
        the dict `{"inputs": ..., "segment_ids": ...}` and `y` the targets, so that
        `model.fit(packed.x, packed.y, sample_weight=packed.sample_weight)` trains on them.

    Raises:
        ValueError: if `row_length` is not a positive integer; `sequences` is empty, holds an
            array that is not 2D `(length, features)` or has no token, or arrays of different
            feature widths; a sequence is longer than `row_length`; `targets` do not hold one
            entry per sequence, of the sequence's length with `targets_per="token"`, and all of
            one shape; or `targets_per` is neither `"token"` nor `"sequence"`.

    Examples:
        >>> import numpy as np
        >>> sequences = [np.full((n, 2), n, "float32") for n in (3, 5, 2, 4)]
        >>> targets = [np.arange(n) for n in (3, 5, 2, 4)]
        >>> packed = pack_sequences(sequences, row_length=7, targets=targets)
        >>> packed.segment_ids
        array([[1, 1, 1, 1, 1, 2, 2],
               [1, 1, 1, 2, 2, 2, 2]], dtype=int32)
        >>> packed.positions
        array([[0, 1, 2, 3, 4, 0, 1],
               [0, 1, 2, 0, 1, 2, 3]], dtype=int32)
        >>> packed.inputs.shape, packed.y.shape, int(packed.sample_weight.sum())
        ((2, 7, 2), (2, 7), 14)
        >>> [len(s) for s in unpack_sequences(packed.inputs, packed)]
        [3, 5, 2, 4]

        For a `tf.data` pipeline, slice the same arrays:

        >>> import tensorflow as tf
        >>> dataset = tf.data.Dataset.from_tensor_slices(
        ...     (packed.x, packed.y, packed.sample_weight)).batch(2)
        >>> x, y, sample_weight = next(iter(dataset))
        >>> tuple(x["segment_ids"].shape)
        (2, 7)
    """
    row_length = _check_length("row_length", row_length)
    arrays = _as_sequences(sequences)
    lengths = [array.shape[0] for array in arrays]
    longest = int(np.argmax(lengths))
    if lengths[longest] > row_length:
        raise ValueError(
            f"Every sequence must fit in a row: `row_length` ({row_length}) must be at least the "
            f"longest sequence's length. Received: sequences[{longest}].shape="
            f"{arrays[longest].shape} with row_length={row_length}"
        )
    if targets is not None:
        target_arrays, target_shape = _as_targets(targets, lengths, targets_per)
    elif targets_per not in TARGETS_PER:
        raise ValueError(
            f"`targets_per` must be one of {TARGETS_PER}. Received: targets_per={targets_per!r}"
        )

    rows = _first_fit_decreasing(lengths, row_length)
    num_rows = int(rows.max()) + 1
    features = arrays[0].shape[1]
    inputs = np.zeros((num_rows, row_length, features), dtype=np.result_type(*arrays))
    segment_ids = np.zeros((num_rows, row_length), dtype=np.int32)
    positions = np.zeros((num_rows, row_length), dtype=np.int32)
    sample_weight = np.zeros((num_rows, row_length), dtype=np.float32)
    packed_targets = None
    if targets is not None:
        target_dtype = np.result_type(*target_arrays)
        packed_targets = np.zeros((num_rows, row_length, *target_shape), dtype=target_dtype)
    starts = np.zeros(len(arrays), dtype=np.int64)
    filled = np.zeros(num_rows, dtype=np.int64)  # tokens placed in each row so far
    next_segment = np.ones(num_rows, dtype=np.int32)
    # Inside a row, the sequences in the order given; each starts where the previous one ended.
    for i in np.argsort(rows, kind="stable").tolist():
        row, length = rows[i], lengths[i]
        start = starts[i] = filled[row]
        filled[row] += length
        span = slice(start, start + length)
        inputs[row, span] = arrays[i]
        segment_ids[row, span] = next_segment[row]
        next_segment[row] += 1
        positions[row, span] = np.arange(length, dtype=np.int32)
        if targets_per == "token":
            sample_weight[row, span] = 1.0
            if targets is not None:
                packed_targets[row, span] = target_arrays[i]
        else:
            sample_weight[row, start + length - 1] = 1.0
            if targets is not None:
                packed_targets[row, start + length - 1] = target_arrays[i]
    return PackedRows(
        inputs=inputs,
        segment_ids=segment_ids,
        positions=positions,
        sample_weight=sample_weight,
        targets=packed_targets,
        sequence_rows=rows,
        sequence_starts=starts,
        sequence_lengths=np.asarray(lengths, dtype=np.int64),
    )


def unpack_sequences(outputs, packed, last_token=False):
    """A model's outputs on packed rows, back per sequence, in the order the sequences were given.

    Use it after `model.predict(packed.x)` (or a model's call on `packed.x`) to read each
    sequence's outputs, as if the model had run on that sequence alone.

    Args:
        outputs: array of shape `(rows, row_length, ...)`: per-token outputs on the rows of
            `packed` (a model with `return_sequences=True`), in the same row order. A tensor
            of any backend is converted to NumPy.
        packed: the `PackedRows` that `pack_sequences` returned for those rows.
        last_token: if `True`, return each sequence's output at its last token only, stacked
            into one array: the prediction for a per-sequence target
            (`targets_per="sequence"`).

    Returns:
        A list of arrays `(length_i, ...)`, one per sequence in the given order; or, with
        `last_token=True`, one array `(num_sequences, ...)`.

    Raises:
        ValueError: if `packed` is not a `PackedRows`, or `outputs` does not start with the
            shape `(rows, row_length)` of `packed`.

    Examples:
        >>> import numpy as np
        >>> sequences = [np.arange(n, dtype="float32")[:, None] for n in (2, 3, 1)]
        >>> packed = pack_sequences(sequences, row_length=4)
        >>> outputs = 10 * packed.inputs  # stands in for model.predict(packed.x)
        >>> [s.ravel().tolist() for s in unpack_sequences(outputs, packed)]
        [[0.0, 10.0], [0.0, 10.0, 20.0], [0.0]]
        >>> unpack_sequences(outputs, packed, last_token=True).ravel().tolist()
        [10.0, 20.0, 0.0]
    """
    if not isinstance(packed, PackedRows):
        raise ValueError(
            "`packed` must be the PackedRows that pack_sequences returned. "
            f"Received: packed={type(packed).__name__}"
        )
    outputs = keras.ops.convert_to_numpy(outputs)
    expected = (packed.num_rows, packed.row_length)
    if outputs.ndim < 2 or tuple(outputs.shape[:2]) != expected:
        raise ValueError(
            f"`outputs` must have shape (rows, row_length, ...) = {expected + ('...',)}, one "
            "output per token of the packed rows, in their order (a model with "
            f"return_sequences=True). Received: outputs.shape={tuple(outputs.shape)}"
        )
    if last_token:
        last = packed.sequence_starts + packed.sequence_lengths - 1
        return outputs[packed.sequence_rows, last]
    placement = zip(
        packed.sequence_rows.tolist(),
        packed.sequence_starts.tolist(),
        packed.sequence_lengths.tolist(),
    )
    return [outputs[row, start : start + length] for row, start, length in placement]


class PackedSequences(keras.utils.PyDataset):
    """A `keras.utils.PyDataset` of packed rows, in batches, in a new random order each epoch.

    Packs the sequences once with `pack_sequences` and serves batches of rows: `dataset[index]`
    is `(x, y, sample_weight)` for the rows of batch `index`, with `x` the dict
    `{"inputs": ..., "segment_ids": ...}` (or `x` alone without targets). The packed rows, in
    their packed order, are `dataset.packed`, a `PackedRows`. Use it with `model.fit` when the
    rows should be shuffled each epoch without a `tf.data` pipeline (any backend), with
    `workers` and `use_multiprocessing` as any `PyDataset`.

    The rows are packed once, not again each epoch: sequences in one row never see each other,
    so which sequences share a row does not change a model's outputs or gradients; which rows
    share a batch does, and that is what the shuffle draws each epoch. Repacking would only
    exchange sequences of equal length, since first-fit decreasing places sequences by length,
    and it would leave the number of rows as it was. So `len(dataset)` is
    `ceil(rows / batch_size)` for every epoch, the last batch holding the remaining rows.

    Args:
        sequences: list of arrays of shape `(length_i, features)`; see `pack_sequences`.
        row_length: int, the number of tokens in a row.
        targets: optional targets, one entry per sequence; see `pack_sequences`.
        targets_per: `"token"` or `"sequence"`; see `pack_sequences`.
        batch_size: int, rows per batch.
        shuffle: bool, whether to draw a new order of the rows before each epoch (and the
            first). Keep `False` for `model.predict`, so that `unpack_sequences(outputs,
            dataset.packed)` reads the outputs in the packed order.
        seed: optional int, seed of the shuffle, for the same orders on every run.
        **kwargs: `keras.utils.PyDataset` arguments: `workers`, `use_multiprocessing`,
            `max_queue_size`.

    Raises:
        ValueError: for anything `pack_sequences` refuses, or a `batch_size` that is not a
            positive integer.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> sequences = [rng.normal(size=(n, 3)).astype("float32") for n in (5, 2, 7, 3, 8)]
        >>> targets = [rng.normal(size=(len(s), 1)).astype("float32") for s in sequences]
        >>> dataset = PackedSequences(sequences, 8, targets, batch_size=2, seed=0)
        >>> len(dataset), dataset.packed.num_rows
        (2, 4)
        >>> x, y, sample_weight = dataset[0]
        >>> x["inputs"].shape, y.shape, sample_weight.shape
        ((2, 8, 3), (2, 8, 1), (2, 8))
    """

    def __init__(
        self,
        sequences,
        row_length,
        targets=None,
        targets_per="token",
        batch_size=32,
        shuffle=True,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.batch_size = _check_length("batch_size", batch_size)
        self.packed = pack_sequences(sequences, row_length, targets, targets_per)
        self.shuffle = shuffle
        self._rng = np.random.default_rng(seed)
        self._order = np.arange(self.packed.num_rows)
        if shuffle:
            self._rng.shuffle(self._order)

    def __len__(self):
        return -(-self.packed.num_rows // self.batch_size)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"`index` must be in [0, {len(self)}). Received: index={index}")
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        packed = self.packed
        x = {"inputs": packed.inputs[rows], "segment_ids": packed.segment_ids[rows]}
        if packed.targets is None:
            return x
        return x, packed.targets[rows], packed.sample_weight[rows]

    def on_epoch_end(self):
        if self.shuffle:
            self._rng.shuffle(self._order)
