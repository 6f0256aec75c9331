"""The recipe of `docs/backends.md` for predicting on many lengths: each sequence padded at its
end to a multiple of a bucket and the outputs cut back give the sequence's own outputs, because
Aaren is causal. The recipe is read from the page, so the page stays true."""

import os
import re

import keras
import pytest
from helpers import FEATURES, assert_close, data

from keras_aaren import Aaren, AarenBlock
from keras_aaren.ops import full_precision_matmuls

PAGE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "backends.md")


def documented_recipe():
    """`predict_in_bucket` as the first Python block of the page's section defines it."""
    with open(PAGE, encoding="utf-8") as f:
        section = f.read().split("### Many lengths through `predict`", 1)[1]
    namespace = {}
    exec(re.search(r"```python\n(.*?)```", section, re.S).group(1), namespace)
    return namespace["predict_in_bucket"]


@pytest.mark.parametrize("steps", [13, 16], ids=["padded", "already-a-multiple"])
def test_predict_in_a_bucket_equals_stepping_the_cells(steps):
    predict_in_bucket = documented_recipe()
    aaren, block = Aaren(2, 4, return_sequences=True), AarenBlock(2, 4)
    model = keras.Sequential([keras.Input((None, FEATURES)), aaren, block])
    # The oracle: the same cells stepped token by token, which never see a later token.
    stepping = keras.Sequential(
        [
            keras.Input((None, FEATURES)),
            keras.layers.RNN(aaren.cell, return_sequences=True),
            keras.layers.RNN(block.cell, return_sequences=True),
        ]
    )
    x = data(2, steps)
    with full_precision_matmuls():
        got = predict_in_bucket(model, x, bucket=8)
        expected = stepping.predict(x, verbose=0)
    assert got.shape == expected.shape == (2, steps, FEATURES)
    assert_close(got, expected, what=f"T={steps} in buckets of 8")
