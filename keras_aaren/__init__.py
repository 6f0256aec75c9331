"""keras_aaren: Aaren ("Attention as an RNN", Feng et al., arXiv 2405.13956) for Keras."""

__version__ = "0.1.0"

from keras_aaren import ops

__all__ = ["ops", "__version__"]
