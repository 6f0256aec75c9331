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
