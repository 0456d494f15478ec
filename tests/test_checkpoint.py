"""Checkpoints reload into the same model, never leave half-written output, and refuse overwrites."""

import copy
import json

import pytest
import torch
import yaml
from tiny_models import ARCHITECTURES as TINY_ARCHITECTURES
from tiny_models import build_tiny_model, build_tiny_tokenizer, save_tiny_model

import linearize
from linearize.architectures import decoder_layers, get_architecture
from linearize.checkpoint import (
    MANIFEST_NAME,
    load,
    read_manifest,
    render_model_card,
    save_checkpoint,
    stage_checkpoint,
)
from linearize.errors import InputError, ModelSourceError, OutputExistsError
from linearize.surgery import (
    AffineMap,
    LinearBlock,
    OutputFold,
    fold_and_remove,
    replace_with_linear,
)

D = 32
SPEC = {"model": "tiny", "layers": [2, 3]}
FOLDABLE = [a for a in TINY_ARCHITECTURES if not a.startswith("gemma")]


def _map(seed: int, *, bias: bool) -> AffineMap:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.eye(D) + 0.2 * torch.randn(D, D, generator=gen)
    return AffineMap(weight, 0.1 * torch.randn(D, generator=gen) if bias else None)


def _folded_model(arch_name: str):
    model = build_tiny_model(arch_name)
    arch = get_architecture(model)
    bias = decoder_layers(model)[0].get_submodule(arch.mlp_out).bias is not None
    return fold_and_remove(model, {(2, 3): OutputFold(_map(0, bias=bias))})


def _linear_model(arch_name: str):
    return replace_with_linear(
        build_tiny_model(arch_name), {(0, 1): _map(0, bias=True), (3, 4): _map(1, bias=False)}
    )


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    return model(ids).logits


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("arch_name", FOLDABLE)
def test_standard_checkpoint_reloads_with_plain_from_pretrained(arch_name, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _folded_model(arch_name)
    out = save_checkpoint(model, build_tiny_tokenizer(), tmp_path / "out", resolved_spec=SPEC)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(_logits(reloaded), _logits(model))
    assert read_manifest(out)["format"] == "standard"
    assert reloaded.config.num_hidden_layers == 4


@pytest.mark.parametrize("arch_name", TINY_ARCHITECTURES)
def test_linear_checkpoint_reloads_with_linearize_load(arch_name, tmp_path):
    model = _linear_model(arch_name)
    out = save_checkpoint(model, build_tiny_tokenizer(), tmp_path / "out", resolved_spec=SPEC)
    reloaded = linearize.load(out)
    assert torch.equal(_logits(reloaded), _logits(model))
    layers = decoder_layers(reloaded)
    assert [isinstance(layer, LinearBlock) for layer in layers] == [True, False, True, False]
    assert layers[0].linear.bias is not None
    assert layers[2].linear.bias is None


def test_linear_checkpoint_refuses_plain_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    out = save_checkpoint(_linear_model("llama"), None, tmp_path / "out", resolved_spec=SPEC)
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(out)


def test_linear_checkpoint_sharded_round_trip_with_dtype(tmp_path):
    model = _linear_model("gpt2")
    out = save_checkpoint(model, None, tmp_path / "out", resolved_spec=SPEC, shard_size="20KB")
    assert (out / "linearize.safetensors.index.json").is_file()
    assert not list(out.glob("model*"))
    assert len(list(out.glob("linearize-*.safetensors"))) > 1
    assert torch.equal(_logits(load(out)), _logits(model))
    assert load(out, dtype="bfloat16").dtype == torch.bfloat16


def test_manifest_records_format_layout_and_spec(tmp_path):
    model = _linear_model("qwen3")
    out = save_checkpoint(model, None, tmp_path / "out", resolved_spec=SPEC)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["format"] == "linear"
    assert manifest["resolved_spec"] == SPEC
    assert manifest["layout"]["linear_blocks"] == model.config.linearize["linear_blocks"]
    config = json.loads((out / "config.json").read_text())
    assert config["linearize"]["origins"] == [[0, 1], [2, 2], [3, 4], [5, 5]]
    assert config["num_hidden_layers"] == len(config["layer_types"]) == 4


def test_tokenizer_round_trips(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_tiny_tokenizer()
    out = save_checkpoint(_folded_model("llama"), tokenizer, tmp_path / "out", resolved_spec=SPEC)
    text = "Linear maps, héllo ✓"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == tokenizer(text).input_ids


def test_save_checkpoint_drops_quantization_config(tmp_path):
    # A GGUF-loaded model carries a quantization_config that save_pretrained refuses.
    model = _linear_model("llama")
    model.config.quantization_config = {"quant_method": "gguf"}
    out = save_checkpoint(model, None, tmp_path / "out", resolved_spec=SPEC)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert torch.equal(_logits(load(out)), _logits(model))


# --- publishing --------------------------------------------------------------------------------


def test_save_checkpoint_refuses_non_empty_output_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        save_checkpoint(_folded_model("llama"), None, out, resolved_spec=SPEC)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _leftovers(tmp_path, "out") == []


def test_save_checkpoint_force_replaces_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    save_checkpoint(_folded_model("llama"), None, out, resolved_spec=SPEC, force=True)
    assert not (out / "old.txt").exists()
    assert (out / MANIFEST_NAME).is_file()
    assert _leftovers(tmp_path, "out") == []


def test_save_checkpoint_accepts_existing_empty_directory(tmp_path):
    (tmp_path / "out").mkdir()
    save_checkpoint(_folded_model("llama"), None, tmp_path / "out", resolved_spec=SPEC)
    assert (tmp_path / "out" / "config.json").is_file()


def test_crash_mid_save_leaves_no_target_and_no_staging(tmp_path):
    tokenizer = build_tiny_tokenizer()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    tokenizer.save_pretrained = crash
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(_folded_model("llama"), tokenizer, tmp_path / "out", resolved_spec=SPEC)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path, "out") == []


def test_crash_before_publish_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with (
        pytest.raises(RuntimeError, match="verification"),
        stage_checkpoint(_folded_model("llama"), None, out, resolved_spec=SPEC, force=True),
    ):
        raise RuntimeError("verification failed")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert _leftovers(tmp_path, "out") == []


def test_staged_checkpoint_verifies_then_publishes_report_and_card(tmp_path):
    model = _linear_model("gemma2")
    card = render_model_card("# Tiny\n\nLayers 0-1 and 3-4 are linear.", base_model="tiny/base")
    with stage_checkpoint(model, None, tmp_path / "out", resolved_spec=SPEC) as staged:
        assert not (tmp_path / "out").exists()
        assert torch.equal(_logits(load(staged.path)), _logits(model))
        out = staged.publish({"report.json": json.dumps({"ppl": 1.0}), "README.md": card})
    assert json.loads((out / "report.json").read_text()) == {"ppl": 1.0}
    readme = (out / "README.md").read_text()
    front = yaml.safe_load(readme.split("---")[1])
    assert front == {"base_model": "tiny/base", "tags": ["linearize", "pruned"]}
    assert readme.rstrip().endswith("Layers 0-1 and 3-4 are linear.")
    assert _leftovers(tmp_path, "out") == []


def test_staged_checkpoint_refuses_nested_extra_file_names(tmp_path):
    staged = stage_checkpoint(_folded_model("llama"), None, tmp_path / "out", resolved_spec=SPEC)
    with staged, pytest.raises(InputError, match="plain file name"):
        staged.publish({"../escape.txt": "x"})
    assert not (tmp_path / "escape.txt").exists()


def test_load_falls_back_to_from_pretrained_for_foreign_checkpoints(tmp_path):
    directory = save_tiny_model("qwen2", tmp_path / "plain")
    assert torch.equal(_logits(load(directory)), _logits(build_tiny_model("qwen2")))


def test_load_refuses_linear_checkpoint_with_missing_weights(tmp_path):
    out = save_checkpoint(_linear_model("llama"), None, tmp_path / "out", resolved_spec=SPEC)
    for file in out.glob("linearize*.safetensors"):
        file.unlink()
    with pytest.raises(ModelSourceError, match="no linearize"):
        load(out)


def _dotted_differences(before: dict, after: dict, prefix: str = "") -> set[str]:
    changed = set()
    for key in set(before) | set(after):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed |= _dotted_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.add(f"{prefix}{key}")
    return changed


def test_compress_copies_every_non_weight_file_byte_for_byte(tmp_path, wikitext_path):
    """A qwen2 model whose tokenizer files came from another family: loading them as a
    Qwen2Tokenizer and saving it again rewrites tokenizer.json (another normalizer and
    pre-tokenizer), so the checkpoint must copy the files, not re-serialise the tokenizer."""
    from transformers import AutoTokenizer

    from api_schemas import CompressSpec, DataSpec
    from linearize import pipeline

    source = save_tiny_model("qwen2", tmp_path / "src", initializer_range=0.3)
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "Qwen2Tokenizer"
    (source / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (source / "README.md").write_text("# the source's card\n")
    (source / "notes.txt").write_bytes(b"anything else the repository ships\x00\xff")
    resaved = tmp_path / "resaved"
    AutoTokenizer.from_pretrained(source).save_pretrained(resaved)
    assert (resaved / "tokenizer.json").read_bytes() != (source / "tokenizer.json").read_bytes()

    spec = CompressSpec(
        model=str(source),
        data=DataSpec(path=str(wikitext_path)),
        calib_tokens=512,
        seq_len=64,
        eval_tokens=256,
        layers=2,
        heal_steps=0,
        generation_prompts=0,
    )
    out = tmp_path / "out"
    report = pipeline.run(spec, output_dir=out)

    others = [
        p for p in source.iterdir() if "safetensors" not in p.name and p.name != "config.json"
    ]
    assert {p.name for p in others} >= {"tokenizer.json", "generation_config.json", "notes.txt"}
    for path in others:
        copy = out / ("README.source.md" if path.name == "README.md" else path.name)
        assert copy.read_bytes() == path.read_bytes(), path.name
    before = json.loads((source / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    changes = report.model.config_changes
    assert _dotted_differences(before, after) == set(changes)
    assert {"num_hidden_layers", "layer_types", "linearize"} <= set(changes)
    assert after["num_hidden_layers"] == 4 and len(after["layer_types"]) == 4


def test_patched_config_fills_a_per_layer_list_the_source_left_to_its_default(tmp_path):
    """Older hub configs have no `layer_types`; transformers derives it. The patched config
    gets the trimmed list, the source's other keys keep their order and values."""
    from transformers import AutoModelForCausalLM

    source = save_tiny_model("qwen2", tmp_path / "src")
    raw = json.loads((source / "config.json").read_text())
    del raw["layer_types"]
    (source / "config.json").write_text(json.dumps(raw))
    model = AutoModelForCausalLM.from_pretrained(source)
    source_config = copy.deepcopy(model.config)
    fold_and_remove(model, {(2, 3): OutputFold(_map(0, bias=False))})
    staged = stage_checkpoint(
        model,
        None,
        tmp_path / "out",
        resolved_spec=SPEC,
        files_dir=source,
        source_config=source_config,
    )
    with staged:
        written = json.loads((staged.path / "config.json").read_text())
        changes = staged.config_changes
        staged.publish()
    assert set(changes) == {"layer_types", "num_hidden_layers", "linearize"}
    assert written["layer_types"] == ["full_attention"] * 4 and written["num_hidden_layers"] == 4
    assert [k for k in written if k in raw] == list(raw)
    assert {k: v for k, v in written.items() if k not in changes} == {
        k: v for k, v in raw.items() if k not in changes
    }
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(reloaded.model.layers) == 4


def test_a_linearize_checkpoint_as_source_does_not_copy_its_report_or_card(tmp_path):
    first = save_checkpoint(
        _folded_model("llama"),
        build_tiny_tokenizer(),
        tmp_path / "first",
        resolved_spec=SPEC,
        extra_files={"report.json": "{}", "README.md": "# ours\n"},
    )
    again = save_checkpoint(
        load(first), None, tmp_path / "again", resolved_spec=SPEC, files_dir=first
    )
    names = {p.name for p in again.iterdir()}
    assert (
        "tokenizer.json" in names
        and (again / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    )
    assert not names & {"report.json", "README.md", "README.source.md"}
