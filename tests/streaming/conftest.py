"""The models the streaming tests share."""

import pytest
from helpers import data, to_numpy
from streaming_models import BATCH, MODELS, STEPS


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def model_and_data(request):
    """A model of each kind, its input (BATCH, STEPS, 3) and its parallel output."""
    model = MODELS[request.param]()
    x = data(BATCH, STEPS, 3, seed=1)
    return model, x, to_numpy(model(x))
