"""Quantized sources (FP8 blocks, MXFP4 experts): read dequantized by transformers' own
quantizer, resident and streamed alike, written dequantized, and named in the report."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tiny_quantized import save_fp8_model, save_mxfp4_model
from transformers import AutoModelForCausalLM

from api_schemas import CompressSpec, DataSpec
from infra.capacity import weights_bytes
from linearize import pipeline
from linearize.cli import main
from linearize.data import find_wikitext
from linearize.errors import UnsupportedQuantizationError
from linearize.placement import open_stack
from linearize.weights import ShardedWeights
from linearize_client.commands import summary_markdown

BUILDERS = {"fp8": save_fp8_model, "mxfp4": save_mxfp4_model}
SCHEMES = {"fp8": "fp8 block 32x32", "mxfp4": "mxfp4"}
STORED = {"fp8": "F8_E4M3", "mxfp4": "U8"}  # what the quantized tensors' headers say


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def quantized(request, tmp_path_factory):
    """(format, source directory, {model name: the builder's dequantized value})."""
    directory, truth = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, directory, truth


def opened(directory, streaming: str):
    loaded, placement = open_stack(str(directory), streaming=streaming, memory_budget="4GB")
    assert placement.mode == ("streamed" if streaming == "on" else "resident")
    return loaded


def test_source_is_stored_quantized(quantized):
    fmt, directory, truth = quantized
    entries = ShardedWeights.open(directory).entries
    assert sum(e.dtype == STORED[fmt] for e in entries.values()) >= len(truth)
    assert not any(key in entries for key in truth if "experts" in key), "not stored fused"


def test_resident_load_equals_the_reference_dequantization(quantized):
    _, directory, truth = quantized
    loaded = opened(directory, "off")
    state = loaded.model.state_dict()
    assert getattr(loaded.model.config, "quantization_config", None) is None
    assert len(truth) >= 8
    for name, value in truth.items():
        assert state[name].dtype == torch.float32, name
        assert torch.equal(state[name], value), name


def test_streamed_load_equals_resident(quantized):
    _, directory, _ = quantized
    resident = opened(directory, "off").model.state_dict()
    streamed = opened(directory, "on")
    for index in range(len(streamed.stack.layers)):
        streamed.stack.prepare(index)
    with streamed.stack.output_head():
        state = streamed.model.state_dict()
        assert state.keys() == resident.keys()
        for name, tensor in resident.items():
            assert state[name].dtype == tensor.dtype, name
            assert torch.equal(state[name], tensor), name


def test_the_service_estimate_counts_the_weights_dequantized_as_the_engine_does(quantized):
    # infra.capacity (no torch) reads the shard headers; the engine sizes its skeleton.
    _, directory, _ = quantized
    _, placement = open_stack(str(directory), streaming="off", memory_budget="4GB")
    config = json.loads((directory / "config.json").read_text())
    on_disk = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    assert weights_bytes(directory, config) == placement.weight_bytes > on_disk


def test_compress_writes_a_dequantized_checkpoint_and_reports_both_sizes(
    quantized, tmp_path, capsys
):
    fmt, directory, _ = quantized
    out = tmp_path / "out"
    code = main(
        [
            "compress",
            *("--model", str(directory), "--data", "wikitext2", "--layers", "2"),
            *("--calib-tokens", "512", "--eval-tokens", "256", "--seq-len", "64"),
            *("--heal-steps", "0", "--generation-prompts", "0", "--no-cache", "--quiet"),
            *("--output", str(out)),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    model, ppl = report["model"], report["perplexity"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert "quantization_config" in model["config_changes"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(reloaded.config, "quantization_config", None) is None
    assert reloaded.config.num_hidden_layers == 2 == model["layers_after"]
    assert all(p.dtype == torch.float32 for p in reloaded.parameters())
    assert ppl["validation_reloaded"] == pytest.approx(ppl["validation_compressed"], rel=1e-5)

    source = model["source_quantization"]
    weights = [*directory.glob("*.safetensors")]
    written = [*out.glob("*.safetensors")]
    assert source == {
        "method": fmt,
        "scheme": SCHEMES[fmt],
        "dtype": source["dtype"],
        "bytes": sum(p.stat().st_size for p in weights),
        "output_dtype": "float32",
        "output_bytes": sum(p.stat().st_size for p in written),
    }
    assert source["output_bytes"] > source["bytes"], "two of four layers go, yet float32 is larger"
    line = next(s for s in printed.splitlines() if s.startswith("quantized"))
    assert SCHEMES[fmt] in line and "written as float32" in line
    markdown = (out / "report.md").read_text()
    assert "## Quantized source" in markdown and f"{source['output_bytes']:,} bytes" in markdown
    job = SimpleNamespace(
        status="succeeded", kind="compress", id="j", attempts=1, spec=None, error=None
    )
    assert f"| quantized source | {SCHEMES[fmt]} ({source['dtype']})" in summary_markdown(
        job, report
    )


def test_streamed_compress_writes_the_resident_tensors_bit_for_bit(quantized, tmp_path):
    # Removal without a map: every written tensor is a source tensor, dequantized, so the
    # checkpoint written from the shards layer by layer holds the resident load's tensors.
    _, directory, _ = quantized
    spec = CompressSpec(
        model=str(directory),
        data=DataSpec(path=str(find_wikitext())),
        indices=[1, 2],
        method="remove",
        streaming="on",
        heal_steps=0,
        generation_prompts=0,
        use_cache=False,
        calib_tokens=256,
        eval_tokens=128,
        seq_len=64,
    )
    report = pipeline.run(spec, output_dir=tmp_path / "out")
    assert report.execution.mode == "streamed"
    written = load_file(tmp_path / "out" / "model.safetensors")
    kept = {0: 0, 3: 1}  # layers 1 and 2 removed, the rest renumbered
    expected = {}
    for name, tensor in opened(directory, "off").model.state_dict().items():
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            if int(index) not in kept:
                continue
            name = f"model.layers.{kept[int(index)]}.{rest}"
        expected[name] = tensor
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name


@pytest.mark.parametrize("method", ["gptq", "bitsandbytes"])
def test_a_quantization_that_cannot_be_dequantized_is_refused_in_one_line(method, tmp_path, capsys):
    source, _ = save_mxfp4_model(tmp_path / "m")
    path = source / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedQuantizationError, match=f"quant_method='{method}'"):
        open_stack(str(source), streaming="auto")
    code = main(
        [
            "compress",
            *("--model", str(source), "--data", "wikitext2", "--layers", "1"),
            *("--output", str(tmp_path / "o"), "--quiet"),
        ]
    )
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    assert f"quant_method={method!r}" in error and "dequantize it first" in error
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_an_fp8_weight_that_is_not_whole_blocks_is_refused_in_one_line(streaming, tmp_path):
    """transformers' dequantize needs whole blocks; a scale grid that does not divide its weight
    is refused before any weight is read, resident and streamed alike, naming the tensor."""
    from safetensors.torch import save_file

    source, _ = save_fp8_model(tmp_path / "m")
    state = load_file(source / "model.safetensors")
    key = "model.layers.1.self_attn.q_proj.weight_scale_inv"
    rows, cols = state[key.removesuffix("_scale_inv")].shape
    state[key] = torch.ones(3, state[key].shape[1])  # 3 row blocks cannot tile the rows
    assert rows % 3
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    expected = f"q_proj.weight \\({rows}x{cols}\\) is not a whole number of its FP8 scale blocks"
    with pytest.raises(UnsupportedQuantizationError, match=expected) as caught:
        open_stack(str(source), streaming=streaming, memory_budget="4GB")
    assert len(str(caught.value).splitlines()) == 1
