"""Every constructor argument of every layer: written in the source, described alike wherever
it is taken, stored, serialized and restored as given."""

import ast
import glob
import inspect
import os
import textwrap

import keras
import numpy as np
import pytest

from keras_aaren import Aaren, AarenBlock, AarenBlockCell, AarenCell

# A value other than the default for every argument a layer takes. A new argument without an
# entry here fails `test_every_argument_survives_config_and_keras_file`.
NON_DEFAULT = {
    "value_dim": 3,
    "output_dim": 5,
    "ffn_dim": 7,
    "activation": "gelu",
    "dropout": 0.25,
    "norm_first": True,
    "layer_norm_epsilon": 1e-3,
    "seed": 7,
    "use_bias": False,
    "kernel_initializer": "he_normal",
    "bias_initializer": "ones",
    "query_initializer": "glorot_normal",
    "kernel_regularizer": "l2",
    "bias_regularizer": "l1",
    "query_regularizer": keras.regularizers.L1L2(l1=0.1, l2=0.2),
    "kernel_constraint": "non_neg",
    "bias_constraint": "unit_norm",
    "query_constraint": keras.constraints.MaxNorm(2.0),
    "method": "associative",
    "return_sequences": True,
    "return_state": True,
    "go_backwards": True,
    "stateful": True,
    "unroll": True,
    "zero_output_for_mask": True,
}
CLASSES = [AarenCell, Aaren, AarenBlockCell, AarenBlock]


def arguments(cls):
    parameters = inspect.signature(cls).parameters.values()
    return [p for p in parameters if p.name not in ("num_heads", "key_dim", "kwargs")]


def non_default(cls, name):
    # `return_sequences` defaults to True for a block; its non-default is False.
    default = inspect.signature(cls).parameters[name].default
    return (not default) if name == "return_sequences" else NON_DEFAULT[name]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_signature_lists_every_argument(cls):
    names = [p.name for p in arguments(cls)]
    missing = [name for name in names if name not in NON_DEFAULT]
    assert not missing, f"no non-default test value for {missing}"
    # The block cell takes every projection argument of the attention cell.
    if cls is AarenBlockCell:
        assert set(p.name for p in arguments(AarenCell)) - {"output_dim"} <= set(names)
    # A sequence layer takes every argument of its cell.
    if cls in (Aaren, AarenBlock):
        cell = AarenCell if cls is Aaren else AarenBlockCell
        assert [p.name for p in arguments(cell)] == names[: len(arguments(cell))]


def wrap(layer, width):
    # A cell is saved inside keras.layers.RNN, built first so that it knows its state sizes; a
    # sequence layer as it is.
    if isinstance(layer, (AarenCell, AarenBlockCell)):
        layer.build((None, width))
        return keras.layers.RNN(layer, return_sequences=True)
    return layer


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_argument_survives_config_and_keras_file(cls, tmp_path):
    names = [p.name for p in arguments(cls)]
    given = {name: non_default(cls, name) for name in names}
    if cls is AarenBlock:
        # A block keeps its input's width; the block cell has no output_dim either.
        assert "output_dim" not in given
    layer = cls(2, 4, **given)
    config = layer.get_config()
    default_config = cls(2, 4).get_config()
    for name in names:
        assert config[name] != default_config[name], f"{name} was not stored as given"

    restored = cls.from_config(config).get_config()
    for name in names:
        assert restored[name] == config[name], name

    inputs = keras.Input(batch_shape=(2, 5, 8))
    outputs = wrap(layer, 8)(inputs)
    model = keras.Model(inputs, outputs)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    inner = loaded.layers[-1]
    loaded_layer = inner.cell if isinstance(layer, (AarenCell, AarenBlockCell)) else inner
    loaded_config = loaded_layer.get_config()
    for name in names:
        assert loaded_config[name] == config[name], name
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "name, value, match",
    [
        ("value_dim", 0, "`value_dim` must be a positive integer or None. Received: value_dim=0"),
        ("use_bias", "yes", "`use_bias` must be a bool. Received: use_bias='yes'"),
        ("kernel_initializer", "no_such_initializer", "no_such_initializer"),
        ("query_constraint", "no_such_constraint", "no_such_constraint"),
    ],
    ids=["value_dim", "use_bias", "initializer", "constraint"],
)
def test_bad_shared_argument_is_named(cls, name, value, match):
    with pytest.raises(ValueError, match=match):
        cls(2, 4, **{name: value})


def source_signature(cls):
    """The `__init__` parameters as written in the class's source: what IDEs and type checkers
    read without running the code."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    init = next(
        node
        for node in tree.body[0].body
        if isinstance(node, ast.FunctionDef) and node.name == "__init__"
    )
    names = [a.arg for a in init.args.args]
    defaults = [ast.literal_eval(d) for d in init.args.defaults]
    return names, dict(zip(names[len(names) - len(defaults) :], defaults)), init.args.kwarg


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_source_signature_lists_every_argument_with_its_default(cls):
    names, defaults, kwarg = source_signature(cls)
    assert names == ["self", "num_heads", "key_dim", *(p.name for p in arguments(cls))]
    assert kwarg is not None and kwarg.arg == "kwargs"
    for parameter in arguments(cls):
        assert defaults[parameter.name] == parameter.default, parameter.name


def test_a_sequence_layer_takes_its_cells_defaults():
    for layer, cell in ((Aaren, AarenCell), (AarenBlock, AarenBlockCell)):
        for parameter in arguments(cell):
            default = inspect.signature(layer).parameters[parameter.name].default
            assert default == parameter.default, f"{layer.__name__}({parameter.name}=...)"


def documented(cls):
    """`{argument: its words}` from the `Args:` section of `cls`'s docstring."""
    section = inspect.getdoc(cls).split("Args:\n", 1)[1].split("\n\n", 1)[0]
    entries, name = {}, None
    for line in section.splitlines():
        if line.startswith("    ") and not line.startswith("        "):
            name, words = line.strip().split(":", 1)
            entries[name] = words
        elif name is not None:
            entries[name] += " " + line.strip()
    return {name: " ".join(words.split()) for name, words in entries.items()}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_docstring_describes_every_argument(cls):
    doc = documented(cls)
    for name in ("num_heads", "key_dim", *(p.name for p in arguments(cls))):
        assert name in doc, f"{cls.__name__}'s docstring does not describe `{name}`"


def test_an_argument_is_described_alike_wherever_it_is_taken():
    # Each class writes its Args: out; an argument taken by several classes means one thing.
    # The block describes `num_heads` and `key_dim` in words of its own ("Aaren heads").
    words = {}
    for cls in CLASSES:
        for name, text in documented(cls).items():
            words.setdefault((name, cls in (AarenBlockCell, AarenBlock)), {})[cls] = text
    for (name, _), texts in words.items():
        assert len(set(texts.values())) == 1, f"`{name}` is described differently: {texts}"


@pytest.mark.parametrize("cls", [Aaren, AarenBlock], ids=lambda c: c.__name__)
def test_a_sequence_layer_shows_its_cells_arguments_as_properties(cls):
    # As keras.layers.LSTM shows LSTMCell's: properties written in the classes, which an IDE
    # sees, and each reads the cell's value.
    cell_class = AarenCell if cls is Aaren else AarenBlockCell
    layer = cls(2, 4, **{p.name: non_default(cell_class, p.name) for p in arguments(cell_class)})
    for name in ("num_heads", "key_dim", *(p.name for p in arguments(cell_class))):
        assert isinstance(inspect.getattr_static(cls, name), property), name
        assert getattr(layer, name) is getattr(layer.cell, name), name


def test_type_checker_sees_every_argument(tmp_path):
    # What an IDE or a type checker reads: mypy, without running the code, on a user's script
    # that constructs each class with keywords. It must report no error, and the constructor it
    # sees must list every argument by name.
    api = pytest.importorskip("mypy.api")
    script = tmp_path / "user.py"
    lines = ["from keras_aaren import Aaren, AarenBlock, AarenBlockCell, AarenCell"]
    for cls in CLASSES:
        keywords = ", ".join(f"{p.name}={p.default!r}" for p in arguments(cls))
        lines.append(f"{cls.__name__}(num_heads=2, key_dim=8, {keywords})")
        lines.append(f"reveal_type({cls.__name__}.__init__)")
    script.write_text("\n".join(lines) + "\n")
    package = os.path.dirname(os.path.dirname(inspect.getfile(AarenCell)))
    sources = [os.path.join(package, "__init__.py")]
    sources += glob.glob(os.path.join(package, "layers", "*.py"))
    report, errors, status = api.run(
        ["--follow-imports=skip", "--ignore-missing-imports", "--no-incremental", str(script)]
        + sources
    )
    assert status == 0, report + errors
    revealed = [line for line in report.splitlines() if "Revealed type" in line]
    assert len(revealed) == len(CLASSES), report
    for cls, line in zip(CLASSES, revealed):
        for name in ("num_heads", "key_dim", *(p.name for p in arguments(cls))):
            assert f" {name}: " in line, f"mypy does not see {cls.__name__}({name}=...)"
