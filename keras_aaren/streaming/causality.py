"""Which layers a stream can run: judged by what each layer does, not by its class.

A stream sees each token once, in order, and keeps nothing but the states of its recurrent
layers. A model streams exactly when each of its layers, wherever its inputs still have a time
axis, either carries its own state over time or acts on each timestep alone. `check_streamable`
walks the model's graph in order and judges each layer:

* Inputs without a time axis (the last output of a recurrent layer with `return_sequences=False`,
  say): the layer sees one summary per chunk of the stream, as it sees one summary of the whole
  sequence in the parallel model, so it streams whatever it does.
* Declared: an attribute `acts_per_timestep` (`ACTS_PER_TIMESTEP`) set to `True` or `False`, on
  the layer's class or on the instance, is taken at its word and no probe runs. It is the way to
  vouch for a layer the probe cannot judge (one that draws random numbers at inference), or to
  refuse one that the probe would let through.
* Recurrent: a `keras.layers.RNN` subclass (Aaren, AarenBlock, LSTM, GRU, a user's own) streams:
  its state carries the past, and the stateful copy or the step model carries that state between
  tokens. One that runs backwards (`go_backwards=True`) reads the future and is refused.
* Nested: a functional or Sequential model inside the model is judged layer by layer, with
  paths such as `inner/dense`.
* Probed: any other layer is called (with `training=False`) on a random sequence of
  `PROBE_TIMESTEPS` timesteps and on each of those timesteps alone. It streams if every output
  keeps the time axis, `(batch, timesteps, ...)`, and equals at every timestep its output on that
  timestep alone, within the square root of its dtype's machine epsilon relative to the output's
  largest value (far below the difference that mixing random timesteps makes). A layer that
  cannot be called on its inputs alone is refused, as is one whose output drops or reshapes the
  time axis (pooling over time, Flatten) or differs (attention, Bidirectional, Conv1D with a
  kernel wider than 1, whatever its padding: a causal convolution needs past inputs, which a
  stream fed token by token does not keep).

The probe replays the layer's call as the model made it (every tensor it was given, a mask
included), on random inputs of the same shapes and dtypes: normal floats, integers 0 and 1 (valid
indices for any embedding of two rows or more), random booleans. It sees `PROBE_TIMESTEPS`
timesteps only, so a layer that mixes timesteps further apart than that should declare
`acts_per_timestep = False`.
"""

import re
import warnings

import keras
import ml_dtypes
import numpy as np

from keras_aaren.streaming.walk import is_graph_model

#: The attribute by which a layer declares that it acts on each timestep alone (or not).
ACTS_PER_TIMESTEP = "acts_per_timestep"

#: How many timesteps the probe feeds a layer.
PROBE_TIMESTEPS = 8

# The batch of the probe's random inputs, where the layer's input does not fix one.
_PROBE_BATCH = 2


def check_streamable(model):
    """Raise a ValueError unless `model` can be served token by token.

    Args:
        model: a built Sequential or functional model.

    Raises:
        ValueError: if the model does not have exactly one input of shape
            `(batch_size, timesteps, features)`, or a layer cannot stream (its path, class and
            the reason are in the message).
    """
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1 or len(inputs[0].shape) != 3:
        shapes = [tuple(x.shape) for x in inputs]
        raise ValueError(
            "Streaming expects a model with one input of shape (batch_size, timesteps, "
            f"features). Received input shapes: {shapes}"
        )
    _check_graph(model, "", [True])


def _check_graph(model, prefix, input_has_time):
    """Judge every layer of a graph model; return, for each output, whether it has a time axis."""
    has_time = {id(t): flag for t, flag in zip(model.inputs, input_has_time)}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        path = f"{prefix}{layer.name}"
        inputs = keras.tree.flatten(layer.input)
        outputs = keras.tree.flatten(layer.output)
        # A tensor the map does not know (a mask that Keras computed beside a layer's output,
        # or one from a second call of a shared layer, as `layer.input` is its first call's) is
        # taken to have a time axis, which judges more strictly.
        flags = [has_time.get(id(t), True) for t in inputs]
        if any(flags):
            out_flags = _judge(path, layer, flags, len(outputs))
        else:
            out_flags = [False] * len(outputs)
        for tensor, flag in zip(outputs, out_flags):
            has_time[id(tensor)] = flag
    return [has_time.get(id(t), True) for t in model.outputs]


def _refuse(path, layer, reason):
    raise ValueError(
        f"Layer '{path}' ({type(layer).__name__}) {reason}, so the model cannot be served token "
        "by token. Expected recurrent layers (keras.layers.RNN subclasses: Aaren, AarenBlock, "
        "LSTM, ...) and layers that act on each timestep alone; a layer that does can declare "
        f"it with `{ACTS_PER_TIMESTEP} = True`."
    )


def _judge(path, layer, flags, num_outputs):
    """Refuse `layer` unless it streams; return which of its outputs have a time axis."""
    declared = getattr(layer, ACTS_PER_TIMESTEP, None)
    if declared is not None:
        if not declared:
            _refuse(path, layer, f"declares `{ACTS_PER_TIMESTEP} = {declared!r}`")
        return [True] * num_outputs
    if is_graph_model(layer):
        return _check_graph(layer, f"{path}/", flags)
    if isinstance(layer, keras.layers.RNN):
        if layer.go_backwards:
            _refuse(path, layer, "runs backwards over time (go_backwards=True)")
        # The sequence (or last) output, then the final states, which have no time axis.
        return [bool(layer.return_sequences)] + [False] * (num_outputs - 1)
    _probe(path, layer, flags)
    return [True] * num_outputs


def _random_input(tensor, has_time, timesteps, rng):
    """A random array shaped like `tensor`, with `timesteps` on its time axis if it has one."""
    shape = list(tensor.shape)
    if has_time:
        shape[1] = timesteps
    shape = [_PROBE_BATCH if n is None else n for n in shape]
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if "int" in dtype:
        # Indices 0 and 1, valid for any embedding of two or more rows.
        return rng.integers(0, 2, size=shape).astype(dtype)
    return rng.normal(size=shape).astype(dtype)


def _message(error):
    """The first informative line of an error (Keras puts a header line above the cause)."""
    for line in str(error).splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
        if line and not line.startswith("Exception encountered when calling"):
            return f"{type(error).__name__}: {line}"
    return type(error).__name__


def _tolerance(output):
    """The rounding the probe forgives: the square root of the dtype's machine epsilon, relative
    to the output's largest value. Mixing random timesteps changes outputs far more."""
    try:
        eps = float(ml_dtypes.finfo(output.dtype).eps)
    except (TypeError, ValueError):
        return 0.0  # integers and booleans compare exactly
    return np.sqrt(eps) * max(1.0, float(np.max(np.abs(output.astype("float64")), initial=0.0)))


def _probe(path, layer, flags):
    """Refuse `layer` unless it acts on each timestep alone (see the module's docstring)."""
    steps = PROBE_TIMESTEPS
    # The layer's own call in the graph, as a model from its input tensors to its outputs: it
    # replays the call as it was made, positional tensors and keyword ones (a mask, say) alike.
    unique = {}
    for tensor, has_time in zip(keras.tree.flatten(layer.input), flags):
        unique.setdefault(id(tensor), (tensor, has_time))
    tensors, time_flags = zip(*unique.values())
    rng = np.random.default_rng(0)
    inputs = [_random_input(t, f, steps, rng) for t, f in zip(tensors, time_flags)]

    def run(arrays):
        # Warnings about the probe's own calls (a softmax over one timestep, say) are not the
        # user's to act on.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outputs = call(list(arrays), training=False)
        return [keras.ops.convert_to_numpy(y) for y in keras.tree.flatten(outputs)]

    try:
        call = keras.Model(list(tensors), keras.tree.flatten(layer.output))
        whole = run(inputs)
    except Exception as error:
        _refuse(path, layer, f"could not be called on {steps} random timesteps ({_message(error)})")
    for output in whole:
        if output.ndim < 2 or output.shape[1] != steps:
            _refuse(
                path,
                layer,
                f"does not keep the time axis: on inputs of {steps} timesteps its output has "
                f"shape {output.shape}, expected (batch, {steps}, ...)",
            )
    for t in range(steps):
        sliced = [x[:, t : t + 1] if f else x for x, f in zip(inputs, time_flags)]
        try:
            alone = run(sliced)
        except Exception as error:
            _refuse(
                path,
                layer,
                f"could not be called on one timestep alone ({_message(error)}), which is how "
                "a stream feeds it",
            )
        for output, single in zip(whole, alone):
            expected = output[:, t : t + 1]
            if single.shape != expected.shape or not np.allclose(
                single.astype("float64"),
                expected.astype("float64"),
                rtol=0.0,
                atol=_tolerance(output),
            ):
                _refuse(
                    path,
                    layer,
                    f"mixes timesteps: on {steps} random timesteps its output at timestep {t} "
                    "differs from its output on that timestep alone (it reads other timesteps: "
                    "future ones, or past inputs that a stream does not keep)",
                )
