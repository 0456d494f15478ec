"""Tiny random models saved quantized, in the on-disk layouts the hub ships.

- FP8 block (`quant_method: fp8`, Qwen3-FP8 / DeepSeek-V3): every linear projection of the
  decoder layers stored as float8_e4m3fn with a float32 `weight_scale_inv` per block, quantized
  by transformers' own `Fp8Quantize`; routers, norms, embeddings and the head stay plain.
- MXFP4 (`quant_method: mxfp4`, gpt-oss): the experts' `gate_up_proj` and `down_proj` stored as
  `*_blocks` (two E2M1 values per byte, 32 values per block) and `*_scales` (one E8M0 exponent
  per block). transformers' MXFP4 quantizer needs the triton kernels, so `mxfp4_pack` below is a
  small reference quantizer of that layout.

Each builder returns the directory and the dequantized value of every quantized tensor, under
the model's own parameter names, computed here independently of transformers' loaders.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny_models import build_tiny_model, build_tiny_tokenizer

FP8_BLOCK = [32, 32]
# Four layers, hidden 64: fp8 blocks of 32x32 tile every projection into more than one block.
FP8_MOE = dict(
    hidden_size=64, num_hidden_layers=4, head_dim=16, mlp_only_layers=[], moe_intermediate_size=32
)
MXFP4_MOE = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=64)

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 magnitudes; bit 3 is the sign


def save_fp8_model(directory: Path, family: str = "qwen3_moe", seed: int = 0):
    """A tiny model in the FP8 block layout (one tensor per expert, as Qwen3-FP8 ships)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    directory = _save_plain(directory, family, seed, FP8_MOE)
    config = FineGrainedFP8Config(weight_block_size=FP8_BLOCK)
    quantize = Fp8Quantize(type("Quantizer", (), {"quantization_config": config})())
    state = load_file(directory / "model.safetensors")
    stored, truth = {}, {}
    for key, tensor in state.items():
        if not _fp8_quantized(key, tensor):
            stored[key] = tensor
            continue
        parts = quantize._quantize_one(key, tensor)
        assert len(parts) == 2, f"{key} {tuple(tensor.shape)} is not tiled by {FP8_BLOCK}"
        weight, scale = parts[key], parts[key.removesuffix("weight") + "weight_scale_inv"]
        stored.update(parts)
        truth[key] = _fp8_dequantize(weight, scale)
    save_file(stored, str(directory / "model.safetensors"), metadata={"format": "pt"})
    quantization = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": FP8_BLOCK,
    }
    _set_quantization(directory, quantization)
    assert all(t.dtype == torch.float32 for t in truth.values())
    return directory, _fused_experts(truth)


def _fp8_quantized(key: str, tensor) -> bool:
    """The hub's choice: the decoder layers' projections, not routers, norms or embeddings."""
    projection = key.endswith("_proj.weight")
    return key.startswith("model.layers.") and projection and tensor.ndim == 2


def _fp8_dequantize(weight, scale):
    """weight × its block's scale, in float32."""
    rows, cols = weight.shape
    block_rows, block_cols = FP8_BLOCK
    expanded = scale.repeat_interleave(block_rows, 0).repeat_interleave(block_cols, 1)
    return weight.float() * expanded[:rows, :cols]


def _fused_experts(truth: dict) -> dict:
    """Per-expert tensors under the fused names the model holds them by (Qwen3-MoE's layout):
    `experts.gate_up_proj` (experts, 2 ff, d), gate rows first; `experts.down_proj`."""
    import re

    import torch

    fused, experts = {}, {}
    for key, tensor in truth.items():
        match = re.fullmatch(r"(.+\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", key)
        if match is None:
            fused[key] = tensor
            continue
        prefix, expert, projection = match.groups()
        experts.setdefault(prefix, {}).setdefault(int(expert), {})[projection] = tensor
    for prefix, by_expert in experts.items():
        ordered = [by_expert[e] for e in sorted(by_expert)]
        fused[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([e["gate"], e["up"]]) for e in ordered]
        )
        fused[f"{prefix}.down_proj"] = torch.stack([e["down"] for e in ordered])
    return fused


def save_mxfp4_model(directory: Path, seed: int = 0):
    """A tiny gpt_oss whose experts are stored in MXFP4, as gpt-oss ships them."""
    from safetensors.torch import load_file, save_file

    directory = _save_plain(directory, "gpt_oss", seed, MXFP4_MOE)
    state = load_file(directory / "model.safetensors")
    stored, truth = {}, {}
    for key, tensor in state.items():
        if not key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stored[key] = tensor
            continue
        # The model holds (experts, in, out); the hub stores (experts, out, in / 32, 16).
        blocks, scales, values = mxfp4_pack(tensor.transpose(1, 2))
        stored[f"{key}_blocks"], stored[f"{key}_scales"] = blocks, scales
        truth[key] = values.transpose(1, 2).contiguous()
    save_file(stored, str(directory / "model.safetensors"), metadata={"format": "pt"})
    not_converted = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "lm_head"]
    _set_quantization(
        directory,
        {"quant_method": "mxfp4", "modules_to_not_convert": [*not_converted, "model.embed_tokens"]},
    )
    return directory, truth


def mxfp4_pack(weight):
    """(blocks uint8 (..., n / 32, 16), scales uint8 (..., n / 32), the dequantized values):
    each run of 32 values along the last axis shares a power-of-two scale chosen so that its
    largest magnitude fits E2M1's largest, 6; each value is rounded to the nearest E2M1 value."""
    import torch

    groups = weight.float().reshape(*weight.shape[:-1], -1, 32)
    largest = groups.abs().amax(-1, keepdim=True).clamp(min=2.0**-100)
    exponent = torch.ceil(torch.log2(largest / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)
    magnitudes = torch.tensor(FP4_VALUES)
    index = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(-1)
    codes = index | ((scaled < 0).long() << 3)
    values = magnitudes[index] * torch.where(scaled < 0, -1.0, 1.0) * torch.exp2(exponent)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    scales = (exponent.squeeze(-1) + 127).to(torch.uint8)
    return packed, scales, values.reshape(weight.shape)


def _save_plain(directory: Path, family: str, seed: int, overrides: dict) -> Path:
    """The float model, saved with transformers as a single file (hub per-expert layout where
    the family has one), with the byte-level tokenizer."""
    directory = Path(directory)
    model = build_tiny_model(family, seed=seed, initializer_range=0.3, **overrides)
    model.save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return directory


def _set_quantization(directory: Path, quantization: dict) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = quantization
    path.write_text(json.dumps(config, indent=2))
