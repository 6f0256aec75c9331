"""The sequence layers' call: nothing of a call is kept on the layer (one layer serves several
threads at once), and the programs of eager calls on JAX are keyed on all they depend on,
bounded, and freed with their layer."""

import concurrent.futures
import gc
import weakref

import keras
import numpy as np
import pytest
from helpers import assert_close, data, make_mask, to_numpy

from keras_aaren import Aaren, AarenBlock
from keras_aaren.ops import program_count, set_program_limit

on_jax = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="only eager calls on JAX compile programs"
)


def requests():
    """Calls that differ in everything a call carries: two lengths, masks, packed segments."""
    cases = []
    for steps in (7, 13):
        for masked in (False, True):
            for packed in (False, True):
                seed = 10 * steps + 2 * masked + packed
                mask = make_mask("holes", 3, steps, seed=seed) if masked else None
                ids = None
                if packed:
                    ids = np.repeat(np.arange(3), -(-steps // 3))[None, :steps]
                    ids = np.repeat(ids, 3, axis=0).astype("int32")
                cases.append((data(3, steps, seed=seed), mask, ids))
    return cases


@pytest.mark.parametrize("layer_class", [Aaren, AarenBlock], ids=lambda c: c.__name__)
def test_one_layer_called_from_8_threads_gives_each_call_its_own_result(layer_class):
    layer = layer_class(2, 4, return_sequences=True, return_state=True)
    cases = requests()
    # Single-threaded answers first; every concurrent call must reproduce its own.
    expected = [[to_numpy(t) for t in layer(x, mask=m, segment_ids=ids)] for x, m, ids in cases]

    def call(index):
        x, mask, ids = cases[index % len(cases)]
        return index, [to_numpy(t) for t in layer(x, mask=mask, segment_ids=ids)]

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, range(160)))
    wrong = []
    for index, got in results:
        want = expected[index % len(cases)]
        if not all(np.allclose(g, w, atol=1e-6, rtol=1e-6) for g, w in zip(got, want)):
            wrong.append(index % len(cases))
    assert not wrong, f"{len(wrong)} of {len(results)} calls got another call's result: {wrong}"


@pytest.fixture
def room_for_programs():
    # Programs of earlier tests may fill the cache; leave room, so that counts show new ones.
    set_program_limit(program_count() + 8)
    yield
    set_program_limit(8)


@on_jax
@pytest.mark.usefixtures("room_for_programs")
def test_a_deleted_layers_programs_are_freed():
    gc.collect()  # layers of earlier tests, and their programs, go first
    layer = Aaren(2, 4, return_sequences=True)
    before = program_count()
    layer(data(2, 5))
    layer(data(2, 20))  # another length bucket
    assert program_count() == before + 2
    alive = weakref.ref(layer)
    del layer
    gc.collect()
    assert alive() is None, "a kept program holds the layer alive"
    assert program_count() == before


@on_jax
@pytest.mark.parametrize(
    "name, value",
    [("go_backwards", True), ("zero_output_for_mask", True), ("return_sequences", False)],
)
def test_an_eager_call_follows_an_option_changed_after_an_earlier_call(name, value):
    # A program traced for the old value must not answer for the new one.
    x = data(2, 6, seed=3)
    mask = make_mask("holes", 2, 6, seed=3)
    mask[:, 0] = True
    layer = Aaren(2, 4, return_sequences=True)
    layer(x, mask=mask)
    setattr(layer, name, value)
    fresh = Aaren(2, 4, **{"return_sequences": True, name: value})
    fresh(x)
    fresh.set_weights(layer.get_weights())
    assert_close(layer(x, mask=mask), fresh(x, mask=mask), what=name)


@on_jax
@pytest.mark.usefixtures("room_for_programs")
def test_an_eager_call_follows_a_method_changed_after_an_earlier_call():
    layer = Aaren(2, 4, return_sequences=True)
    x = data(2, 6, seed=4)
    layer(x)
    count = program_count()
    layer.method = "associative"
    layer(x)
    assert program_count() == count + 1, "the chunked scan's program answered"


@on_jax
def test_eager_programs_follow_the_weights():
    layer = Aaren(2, 4, return_sequences=True)
    x = data(2, 6, seed=5)
    first = to_numpy(layer(x))
    layer.set_weights([w * 2.0 for w in layer.get_weights()])
    stepped = keras.layers.RNN(layer.cell, return_sequences=True)(x)
    assert not np.allclose(to_numpy(layer(x)), first)
    assert_close(layer(x), stepped)
