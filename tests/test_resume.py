"""Resumable compress runs (linearize.resume): an interrupted run, run again, takes over its
state and ends with the checkpoint an uninterrupted run writes; changed inputs start clean."""

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_model

from api_schemas import CompressSpec, DataSpec
from linearize import cache, pipeline
from linearize.cli import main
from linearize.data import find_wikitext
from linearize.resume import (
    HealingCheckpoints,
    maps_as_tensors,
    maps_from_tensors,
    slot_for_arguments,
)
from linearize.surgery import AffineMap, OutputFold

HEAL_STEPS = 20
KILLED_AT = 13  # the interrupted run dies after this step; its last checkpoint is at 10


class Killed(BaseException):
    """Stands for SIGKILL: nothing of the run's own cleanup may depend on it."""


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_model(
        "llama", tmp_path_factory.mktemp("models") / "llama", initializer_range=0.3
    )


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    with find_wikitext().open("rb") as fh:
        path.write_bytes(fh.read(60_000))
    return path


@pytest.fixture(autouse=True)
def checkpoint_every_5_steps(monkeypatch):
    monkeypatch.setenv("LINEARIZE_HEAL_CHECKPOINT_STEPS", "5")


def spec_for(model, text, **kw):
    fields = dict(calib_tokens=1024, seq_len=64, eval_tokens=512, layers=2, generation_prompts=0)
    return CompressSpec(
        model=str(model), data=DataSpec(path=str(text)), heal_steps=HEAL_STEPS, **{**fields, **kw}
    )


def kill_healing_after(monkeypatch, step: int) -> None:
    original = HealingCheckpoints.after_step

    def after_step(self, params, optimizer, generator, losses, elapsed):
        original(self, params, optimizer, generator, losses, elapsed)
        if len(losses) == step:
            raise Killed

    monkeypatch.setattr(HealingCheckpoints, "after_step", after_step)


def weights(directory) -> dict:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_resume_from_healing_checkpoint_writes_the_uninterrupted_checkpoint(
    tiny_llama, text, tmp_path, monkeypatch
):
    spec = spec_for(tiny_llama, text)
    whole = pipeline.run(spec, output_dir=tmp_path / "whole")
    assert whole.resumed is None

    with monkeypatch.context() as patch:
        kill_healing_after(patch, KILLED_AT)
        with pytest.raises(Killed):
            pipeline.run(spec, output_dir=tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists(), "nothing published by the killed run"
    resumed = pipeline.run(spec, output_dir=tmp_path / "resumed")

    assert resumed.resumed.healing_step == 10
    assert resumed.resumed.stages == [
        "selection",
        "fitted maps",
        "perplexity before healing",
        "healing from step 10",
    ]
    assert any("healing resumed from the checkpoint at step 10" in n for n in resumed.notes)
    assert resumed.selection["healing"]["steps"] == HEAL_STEPS
    curve = [loss for _, loss in whole.selection["healing"]["curve"]]
    assert [loss for _, loss in resumed.selection["healing"]["curve"]] == pytest.approx(
        curve, rel=1e-5
    )
    expected, got = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.perplexity.compressed == pytest.approx(whole.perplexity.compressed, rel=1e-5)
    assert not (cache.cache_dir() / "resume" / slot_for_arguments(spec)).exists(), (
        "published: nothing is left to resume"
    )


def test_resume_refused_when_the_data_file_changed(tiny_llama, text, tmp_path, monkeypatch):
    spec = spec_for(tiny_llama, text)
    with monkeypatch.context() as patch:
        kill_healing_after(patch, 6)
        with pytest.raises(Killed):
            pipeline.run(spec, output_dir=tmp_path / "out")
    # The same path, other bytes: the windows the state was computed on are gone.
    text.write_text(text.read_text(encoding="utf-8")[::-1], encoding="utf-8")

    report = pipeline.run(spec, output_dir=tmp_path / "out")

    assert report.resumed.stages == []
    assert report.resumed.refused == "the data's hash changed since the interrupted run"
    assert "resume refused: the data's hash changed since the interrupted run; starting clean" in (
        report.notes
    )
    assert report.selection["healing"]["steps"] == HEAL_STEPS


def test_cli_compress_run_again_resumes_and_says_so_from_the_intact_checkpoint(
    tiny_llama, text, tmp_path, monkeypatch, capsys
):
    args = [
        "compress",
        "--model",
        str(tiny_llama),
        "--data",
        str(text),
        "--calib-tokens",
        "1024",
        "--seq-len",
        "64",
        "--eval-tokens",
        "512",
        "--layers",
        "2",
        "--heal-steps",
        str(HEAL_STEPS),
        "--generation-prompts",
        "0",
        "--output",
        str(tmp_path / "out"),
        "--quiet",
    ]
    original = HealingCheckpoints.after_step

    def interrupted(self, params, optimizer, generator, losses, elapsed):
        original(self, params, optimizer, generator, losses, elapsed)
        if len(losses) == 17:
            raise KeyboardInterrupt  # Ctrl-C

    with monkeypatch.context() as patch:
        patch.setattr(HealingCheckpoints, "after_step", interrupted)
        assert main(args) == 3
    assert "interrupted; the same command resumes it" in capsys.readouterr().err
    # Checkpoints at steps 5, 10 and 15 alternate between two files: the newest (15) is
    # damaged, as by a kill while it was written; the other one (10) is taken.
    slots = list((cache.cache_dir() / "resume").glob("args-*/heal-0.pt"))
    newest = [path for path in slots if torch.load(path, weights_only=True)["step"] == 15]
    assert len(newest) == 1
    newest[0].write_bytes(b"not a checkpoint")

    assert main(args) == 0
    out = capsys.readouterr().out
    assert (
        "resumed    selection, fitted maps, perplexity before healing, healing from step 10" in out
    )


def test_maps_round_trip_as_plain_tensors():
    fold = OutputFold(mlp=AffineMap(torch.randn(4, 4), None), attn=AffineMap(torch.randn(4, 4)))
    block = AffineMap(torch.randn(4, 4), torch.randn(4))
    maps = maps_from_tensors(maps_as_tensors({(2, 3): fold, (5, 5): block}))
    assert maps[(2, 3)].mlp.weight.equal(fold.mlp.weight) and maps[(2, 3)].mlp.bias is None
    assert maps[(2, 3)].attn.weight.equal(fold.attn.weight)
    assert maps[(5, 5)].bias.equal(block.bias) and not isinstance(maps[(5, 5)], OutputFold)
