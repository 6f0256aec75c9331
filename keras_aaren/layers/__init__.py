"""Keras layers: Aaren as a parallel sequence layer and as a recurrent cell."""

from keras_aaren.layers.aaren import Aaren, AarenCell

__all__ = ["Aaren", "AarenCell"]
