"""keras_aaren: Aaren ("Attention as an RNN", Feng et al., arXiv 2405.13956) for Keras."""

__version__ = "1.0.0"

from keras_aaren import distribution, ops, streaming
from keras_aaren.layers import Aaren, AarenBlock, AarenBlockCell, AarenCell
from keras_aaren.packing import PackedRows, PackedSequences, pack_sequences, unpack_sequences
from keras_aaren.streaming import reset_states

__all__ = [
    "Aaren",
    "AarenBlock",
    "AarenBlockCell",
    "AarenCell",
    "distribution",
    "ops",
    "streaming",
    "packing",
    "pack_sequences",
    "unpack_sequences",
    "PackedRows",
    "PackedSequences",
    "reset_states",
    "__version__",
]
