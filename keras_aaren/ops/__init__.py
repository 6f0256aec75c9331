"""Aaren's math on `keras.ops`: no weights, no layers; every backend runs it."""

from keras_aaren.ops.naive import aaren_attention_naive
from keras_aaren.ops.precision import full_precision_matmuls
from keras_aaren.ops.scan import (
    METHODS,
    aaren_combine,
    aaren_scan,
    aaren_step,
    identity_state,
    readout,
)

__all__ = [
    "METHODS",
    "aaren_attention_naive",
    "aaren_combine",
    "aaren_scan",
    "aaren_step",
    "full_precision_matmuls",
    "identity_state",
    "readout",
]
