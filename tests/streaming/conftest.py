"""The models the streaming tests share, and the skip of the export doctests off TensorFlow."""

import keras
import pytest
from helpers import data, to_numpy
from streaming_models import BATCH, MODELS, STEPS


def pytest_collection_modifyitems(config, items):
    # The export docstrings run TensorFlow's SavedModel and TFLite tools, which exist only there.
    if keras.backend.backend() == "tensorflow":
        return
    skip = pytest.mark.skip(reason="SavedModel and TFLite export need the TensorFlow backend")
    for item in items:
        if item.name.startswith("keras_aaren.streaming.export."):
            item.add_marker(skip)


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def model_and_data(request):
    """A model of each kind, its input (BATCH, STEPS, 3) and its parallel output."""
    model = MODELS[request.param]()
    x = data(BATCH, STEPS, 3, seed=1)
    return model, x, to_numpy(model(x))
