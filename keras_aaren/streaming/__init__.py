"""Streaming: serve a model trained in parallel one token at a time, in constant memory.

Three forms of the same trained weights:

* `to_streaming(model, batch_size)`: a stateful clone; feed it chunks of any length (one token,
  or many) and it continues where it stopped. `reset_states`, `get_states` / `set_states` and
  `save_states` / `load_states` manage its state, for checkpointing a long-running stream.
* `make_step_model(model, batch_size)`: a stateless Keras model
  `[x_t, *states] -> [y_t, *new_states]`; `make_step_function` compiles it once
  (`tf.function` on TensorFlow, `jax.jit` on JAX) as `step(x_t, states) -> (y_t, new_states)`.
* `export_saved_model(model, path, batch_size)`, `export_tflite(...)` and `export_onnx(...)`:
  that step as a SavedModel, a LiteRT flatbuffer (float32, float16 or int8) or an ONNX graph
  (float32 or int8), for TensorFlow Serving, LiteRT's interpreter and ONNX Runtime.

The state of every recurrent layer is a fixed list of `(batch_size, size)` tensors (for Aaren:
`[y, c]`, the previous output and the paper's state $(m, u, w)$ in one tensor); its size never
depends on how many tokens were seen.

Which models stream: the result is exact when every layer acts causally along time, and a layer
is judged by what it does, not by its class, so a user's own layers and subclasses are judged
alike. In the model's order, a layer whose inputs no longer have a time axis (after a recurrent
layer with `return_sequences=False`) streams whatever it does; otherwise

1. a layer with an attribute `acts_per_timestep` set to `True` or `False` (on its class or on the
   instance) is taken at its word: it streams, or it is refused;
2. a recurrent layer (a `keras.layers.RNN` subclass: Aaren, AarenBlock, LSTM, GRU, ...) streams,
   since it carries its own state, unless it runs backwards (`go_backwards=True`);
3. a nested functional or Sequential model is judged layer by layer;
4. any other layer is probed: called on a random sequence of a few timesteps and on each of those
   timesteps alone, it streams if its output keeps the time axis and equals, at every timestep
   and within the rounding of its dtype, its output on that timestep alone (Dense,
   LayerNormalization, Dropout, Masking, Embedding, TimeDistributed(Dense), Conv1D with kernel
   size 1, ...).

Everything else is refused with a ValueError naming the layer and why: Bidirectional and
attention over time look at future timesteps; pooling over time and Flatten drop the time axis;
Conv1D with a kernel wider than 1 needs past inputs, which a stream fed token by token does not
keep (with `padding="causal"` too). The probe sees a few timesteps only: a layer that mixes
timesteps further apart than that should declare `acts_per_timestep = False`.
"""

from keras_aaren.streaming.convert import (
    initial_states,
    make_step_function,
    make_step_model,
    to_streaming,
)
from keras_aaren.streaming.export import export_onnx, export_saved_model, export_tflite
from keras_aaren.streaming.state import (
    get_states,
    load_states,
    reset_states,
    save_states,
    set_states,
)

__all__ = [
    "to_streaming",
    "reset_states",
    "get_states",
    "set_states",
    "save_states",
    "load_states",
    "make_step_model",
    "initial_states",
    "make_step_function",
    "export_saved_model",
    "export_tflite",
    "export_onnx",
]
