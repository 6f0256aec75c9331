"""The three sequence encoders every example compares, at the same width and depth.

* `"aaren"`: a stack of `AarenBlock`s (Aaren attention + feed-forward, post-norm). Causal by
  construction; its summary of a sequence is the last block's output at the last real token, or
  (`readout="mean"`, used for classification) the masked mean over tokens.
* `"transformer"`: the same blocks with `keras.layers.MultiHeadAttention` in place of Aaren.
  Bidirectional for whole-sequence tasks, causal (`use_causal_mask=True`) for next-event
  prediction; its summary of a sequence is the masked mean over tokens, as in the keras.io
  time-series Transformer.
* `"lstm"`: a stack of `keras.layers.LSTM`s; its summary is the last state.

Each starts with a `Dense` projection to the model width, so all three see the same features.
Both attention models then add the same sinusoidal position encoding: attention scores tokens by
content, and without positions neither can tell "12 months ago" from "yesterday" (without them
Aaren's elnino forecasting error is twice the Transformer's: docs/results.md). To serve such a
model token by token, add the encoding of the token's index to each new input, a counter kept
beside the layer states; the streaming examples (`quickstart.py`, `streaming_co2.py`) build
models without positions.
Padded timesteps are marked with `PAD` in the inputs; a `keras.layers.Masking` layer turns them
into a Keras mask that every layer here honours.

Shape letters used in this module: B batch, T timesteps, F model width.
"""

import json
import math

import keras
import numpy as np

from keras_aaren import AarenBlock

MODELS = ("aaren", "transformer", "lstm")

# The value padded timesteps carry. The inputs are standardized, so no real reading comes near it.
PAD = -1e4


@keras.saving.register_keras_serializable(package="examples")
class SinePositionEncoding(keras.layers.Layer):
    """Adds the sinusoidal position encoding of Vaswani et al. (2017) to `(B, T, F)` inputs."""

    def __init__(self, max_wavelength=10000, **kwargs):
        super().__init__(**kwargs)
        self.max_wavelength = max_wavelength
        self.supports_masking = True

    def call(self, inputs):
        timesteps = keras.ops.shape(inputs)[1]
        width = inputs.shape[-1]
        positions = keras.ops.cast(keras.ops.arange(timesteps), "float32")[:, None]
        # Even features get sines, odd features cosines, at geometrically spaced frequencies.
        frequencies = keras.ops.exp(
            keras.ops.cast(2 * (keras.ops.arange(width) // 2), "float32")
            * (-math.log(self.max_wavelength) / width)
        )
        angles = positions * frequencies[None, :]
        is_even = keras.ops.arange(width) % 2 == 0
        encoding = keras.ops.where(is_even[None, :], keras.ops.sin(angles), keras.ops.cos(angles))
        return inputs + keras.ops.cast(encoding, inputs.dtype)[None]

    def get_config(self):
        return {**super().get_config(), "max_wavelength": self.max_wavelength}


@keras.saving.register_keras_serializable(package="examples")
class AttentionMask(keras.layers.Layer):
    """`(B, T, T)` boolean: query and key are both real (not `PAD`) timesteps."""

    def call(self, inputs):
        real = keras.ops.any(keras.ops.not_equal(inputs, PAD), axis=-1)  # (B, T)
        return keras.ops.logical_and(real[:, :, None], real[:, None, :])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], input_shape[1])


def transformer_block(x, padding_mask, num_heads, key_dim, ffn_dim, dropout, causal, name):
    # Post-norm, like AarenBlock's default, so that attention is the only difference.
    width = x.shape[-1]
    # The padding mask goes in explicitly: with masks only propagated (Keras 3.15), the second of
    # two stacked MultiHeadAttention blocks attended to padded timesteps.
    attended = keras.layers.MultiHeadAttention(
        num_heads, key_dim, dropout=0.0, name=f"{name}_attention"
    )(x, x, attention_mask=padding_mask, use_causal_mask=causal)
    attended = keras.layers.Dropout(dropout)(attended)
    x = keras.layers.LayerNormalization(epsilon=1e-5)(keras.layers.Add()([x, attended]))
    hidden = keras.layers.Dense(ffn_dim, activation="relu")(x)
    hidden = keras.layers.Dropout(dropout)(keras.layers.Dense(width)(hidden))
    return keras.layers.LayerNormalization(epsilon=1e-5)(keras.layers.Add()([x, hidden]))


def encoder(
    inputs,
    kind,
    width=64,
    depth=2,
    num_heads=4,
    dropout=0.1,
    summarize=True,
    causal=False,
    readout="last",
    query_initializer=None,
    positions=True,
    masking=True,
):
    """Encodes `inputs` (B, T, features) with the model `kind`, one of `MODELS`.

    Returns `(B, F)` when `summarize`, else `(B, T, F)`. `causal` only matters for the
    Transformer: Aaren and the LSTM never see the future. `readout` only matters for Aaren: its
    summary is its output at the last real token (`"last"`, what a causal model knows at the end
    of the sequence) or the masked mean over tokens (`"mean"`, the Transformer's readout).
    `query_initializer` only matters for Aaren: that of its learned query tokens (`None`, the
    layer's default N(0, 1), or `"zeros"`: every token starts with the same score, so each output
    starts as the running mean of the values).
    `positions` only matters for the attention models: whether they add the sinusoidal position
    encoding (`False` for inputs that carry their own notion of time, such as the Decision
    Transformer's timestep embedding, which stays the same whether the model reads a window of
    an episode or streams all of it).
    `masking`: whether padded timesteps (`PAD`) are masked. `False` leaves out the `Masking`
    layer and the Transformer's padding mask, for causal models whose inputs are padded only
    after their real tokens, where padding cannot reach an output that counts.
    """
    if kind not in MODELS:
        raise ValueError(f"`kind` must be one of {MODELS}. Received: kind={kind!r}")
    if readout not in ("last", "mean"):
        raise ValueError(f"`readout` must be 'last' or 'mean'. Received: readout={readout!r}")
    key_dim = width // num_heads
    x = keras.layers.Masking(mask_value=PAD)(inputs) if masking else inputs
    x = keras.layers.Dense(width, name="input_projection")(x)
    if kind != "lstm" and positions:
        x = SinePositionEncoding()(x)
    if kind == "aaren":
        for i in range(depth):
            # With the "last" readout the last block returns its output at the last real token.
            last = summarize and readout == "last" and i == depth - 1
            x = AarenBlock(
                num_heads,
                key_dim,
                ffn_dim=2 * width,
                dropout=dropout,
                return_sequences=not last,
                query_initializer=query_initializer,
                name=f"aaren_block_{i + 1}",
            )(x)
        if summarize and readout == "mean":
            # The Transformer's readout. A stream keeps it as a running sum and a token count
            # beside the layer states.
            return keras.layers.GlobalAveragePooling1D()(x)
        return x
    if kind == "lstm":
        for i in range(depth):
            last = summarize and i == depth - 1
            x = keras.layers.LSTM(width, return_sequences=not last, name=f"lstm_{i + 1}")(x)
            x = keras.layers.Dropout(dropout)(x)
        return x
    padding_mask = AttentionMask()(inputs) if masking else None
    for i in range(depth):
        x = transformer_block(
            x,
            padding_mask,
            num_heads,
            key_dim,
            2 * width,
            dropout,
            causal,
            name=f"transformer_block_{i + 1}",
        )
    return keras.layers.GlobalAveragePooling1D()(x) if summarize else x


def pad(sequences):
    """Pads a list of `(timesteps, features)` arrays at the end with `PAD` to `(B, T, features)`."""
    return keras.utils.pad_sequences(sequences, padding="post", dtype="float32", value=PAD)


def mean_std(values, digits=3):
    """`"mean ± std"` of a list of numbers, as the results tables print them."""
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def write_outputs(stem, results, table_lines, plot):
    """Writes `{stem}.json` (the results), `{stem}.md` (the table) and `{stem}.png` (via
    `plot(results, path)`), prints the table and returns the paths of the table and the plot."""
    with open(f"{stem}.json", "w") as f:
        json.dump(results, f, indent=2)
    with open(f"{stem}.md", "w") as f:
        f.write("\n".join(table_lines) + "\n")
    plot(results, f"{stem}.png")
    print("\n".join(table_lines))
    return {"table": f"{stem}.md", "plot": f"{stem}.png"}
