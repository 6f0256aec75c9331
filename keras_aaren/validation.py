"""The argument checks of the whole package: one message format, written once.

Every check raises a `ValueError` that names the argument, says what was expected and shows what
was received, in the form Keras uses (``Received: name=value``).
"""


def check_positive_int(name, value, allow_none=False):
    """Raise a ValueError naming `name` unless `value` is a positive int (or None if allowed)."""
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"`{name}` must be {expected}. Received: {name}={value!r}")


def check_rate(name, value):
    """Raise a ValueError naming `name` unless `value` is a float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be a float in [0, 1). Received: {name}={value!r}")


def check_positive_float(name, value):
    """Raise a ValueError naming `name` unless `value` is a positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"`{name}` must be a positive float. Received: {name}={value!r}")


def check_bool(name, value):
    """Raise a ValueError naming `name` unless `value` is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool. Received: {name}={value!r}")


def check_seed(name, value):
    """Raise a ValueError naming `name` unless `value` is an int or None."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"`{name}` must be an integer or None. Received: {name}={value!r}")


def _dims_match(got, expected):
    # None (an unknown dimension) matches anything.
    return len(got) == len(expected) and all(
        g is None or e is None or g == e for g, e in zip(got, expected)
    )


def check_shape(name, shape, expected, layout=None):
    """Raise a ValueError unless `shape` has the rank of `expected` and matches it where known.

    Args:
        name: the argument's name, as the user wrote it (`"mask"`, `"initial_state.m"`).
        shape: the received shape; `None` entries are unknown dimensions.
        expected: the expected shape; `None` entries match any size.
        layout: optional words for the expected shape, e.g. `"(batch_size, timesteps)"`.
    """
    shape = tuple(shape)
    expected = tuple(expected)
    if not _dims_match(shape, expected):
        if layout is None:
            described = f"{expected}"
        elif all(e is None for e in expected):
            described = layout  # only the rank is known: the layout says it
        else:
            described = f"{layout} = {expected}"
        raise ValueError(f"`{name}` must have shape {described}. Received: {name}.shape={shape}")


def check_segment_ids(shape, dtype, expected):
    """Raise a ValueError unless segment ids of `shape` and `dtype` are integers of `expected`.

    Args:
        shape: the received shape.
        dtype: the received dtype, standardized (`keras.backend.standardize_dtype`).
        expected: `(batch_size, timesteps)` as far as known (None matches anything).
    """
    check_shape("segment_ids", shape, expected, "(batch_size, timesteps)")
    if "int" not in dtype:
        raise ValueError(
            "`segment_ids` must be integers, one segment id per token. "
            f"Received: segment_ids.dtype={dtype}"
        )
