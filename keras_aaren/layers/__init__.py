"""Keras layers: Aaren as a parallel sequence layer and as a recurrent cell, alone or in a
Transformer-style block."""

from keras_aaren.layers.aaren import Aaren, AarenCell
from keras_aaren.layers.aaren_block import AarenBlock, AarenBlockCell
from keras_aaren.layers.base import ParallelRNN

__all__ = ["Aaren", "AarenBlock", "AarenBlockCell", "AarenCell", "ParallelRNN"]
