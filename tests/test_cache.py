"""The cache's keys: same weights -> same fingerprint wherever they were loaded from."""

import torch
from tiny_models import save_tiny_model

from linearize.cache import model_fingerprint
from linearize.loading import load_model


def test_fingerprint_ignores_the_load_path_but_not_the_weights(tmp_path):
    first = save_tiny_model("llama", tmp_path / "a")
    model = load_model(str(first)).model
    copy_path = save_tiny_model("llama", tmp_path / "b")  # the same seed: the same weights
    copy = load_model(str(copy_path)).model
    assert model.config._name_or_path != copy.config._name_or_path
    assert model_fingerprint(model) == model_fingerprint(copy)
    with torch.no_grad():
        next(copy.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(model) != model_fingerprint(copy)
