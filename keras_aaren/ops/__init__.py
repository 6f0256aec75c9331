"""Aaren's math on `keras.ops`: no weights, no layers; every backend runs it.

One algorithm per module: `naive` (the O(T²) reference the tests compare against), `recurrence`
(the state, ⊕, one step), `sequential` (the recurrence in a loop), `associative` (the paper's
parallel scan), `chunked` (the default scan and its closed-form gradient); `segments` holds what
every algorithm does at a segment start, `context_parallel` places a scan on devices that split
the time axis, `backend` holds what differs between TensorFlow, JAX and PyTorch, and `scan`
validates and dispatches.
"""

from keras_aaren.ops.backend import (
    full_precision_matmuls,
    program_count,
    set_program_limit,
)
from keras_aaren.ops.context_parallel import SequenceSharding
from keras_aaren.ops.naive import aaren_attention_naive
from keras_aaren.ops.recurrence import aaren_combine, aaren_step, identity_state, readout
from keras_aaren.ops.scan import METHODS, aaren_scan

__all__ = [
    "METHODS",
    "SequenceSharding",
    "aaren_attention_naive",
    "aaren_combine",
    "aaren_scan",
    "aaren_step",
    "program_count",
    "full_precision_matmuls",
    "identity_state",
    "readout",
    "set_program_limit",
]
