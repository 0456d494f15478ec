"""Model sources: local safetensors dirs, the HF cache offline, refusals."""

import os
import subprocess
import sys

import pytest
from tiny_models import save_tiny_model

from linearize.errors import ModelSourceError
from linearize.loading import load_model


def test_local_directory_loads_in_its_own_dtype(tmp_path):
    import torch

    path = save_tiny_model("qwen2", tmp_path / "m")
    model = load_model(str(path)).model
    assert next(model.parameters()).dtype == torch.float32
    assert load_model(str(path), dtype="bfloat16").model.dtype == torch.bfloat16


def test_pickle_only_directory_is_refused(tmp_path):
    path = save_tiny_model("llama", tmp_path / "m")
    for f in path.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelSourceError, match="pickle checkpoints"):
        load_model(str(path))


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        load_model(str(tmp_path))


def test_hub_id_loads_offline_from_a_populated_cache(tmp_path):
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    save_tiny_model("llama", snapshot)
    refs = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = (
        "from linearize.loading import load_model; "
        "m = load_model('tiny-org/tiny-llama'); print(m.model.config.num_hidden_layers)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "6"
