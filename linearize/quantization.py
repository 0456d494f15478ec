"""Sources stored quantized: read dequantized, resident and streamed alike, and described.

Hub checkpoints of mixtures of experts often ship quantized blocks: FP8 with a scale per weight
block (`quant_method: fp8`, Qwen3-FP8, DeepSeek-V3) or MXFP4 experts (`quant_method: mxfp4`,
gpt-oss). The fold, healing and the checkpoint writer work on plain tensors, so such a source is
dequantized as it is read, by transformers' own quantizer in its dequantize mode: a resident load
passes its config to `from_pretrained`, a streamed one adds the same quantizer's conversion ops
to the shard reader (`linearize.weights`), so both give the same tensors. A method transformers
cannot dequantize on the CPU (GPTQ, AWQ, bitsandbytes, ... need their kernels) is refused
before any weight is read.
"""

from __future__ import annotations

from pathlib import Path

from linearize.errors import UnsupportedQuantizationError

# quant_method -> what the quantized tensors are stored as
DEQUANTIZABLE = {
    "fp8": "float8_e4m3fn",
    "mxfp4": "e2m1 pairs in uint8 with e8m0 block scales",
}
FP8_FORMATS = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}


def method_of(config) -> str | None:
    """The config's `quantization_config.quant_method` (a dict or transformers' config object),
    or None for a plain source."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    if isinstance(quantization, dict):
        return str(quantization.get("quant_method"))
    return str(getattr(quantization, "quant_method", None))


def refuse_unsupported(config, where) -> None:
    """One line naming the method and what to do, for a quantization that cannot be read here."""
    method = method_of(config)
    if method is None or method in DEQUANTIZABLE:
        return
    readable = " and ".join(DEQUANTIZABLE)
    raise UnsupportedQuantizationError(
        f"{where} is stored quantized with quant_method={method!r}, which cannot be dequantized "
        f"here (linearize dequantizes {readable} sources): dequantize it first where its "
        "kernels run (load it with transformers and save_pretrained in bfloat16), then compress "
        "that copy"
    )


def refuse_partial_blocks(config, shapes: dict, where) -> None:
    """Refuse, before any weight is read, an FP8 source whose weight is not a whole number of
    its scale blocks: transformers' dequantize (which both loads use) divides the weight by its
    scale grid and stops with a traceback mid-load otherwise. `shapes`: stored name -> shape,
    from the shard headers."""
    if method_of(config) != "fp8":
        return
    for key, scale in shapes.items():
        weight = shapes.get(key.removesuffix("_scale_inv")) if key.endswith("_scale_inv") else None
        if weight is None or len(scale) < 2 or len(weight) < 2:
            continue
        (rows, cols), (grid_rows, grid_cols) = weight[-2:], scale[-2:]
        if rows % grid_rows or cols % grid_cols:
            raise UnsupportedQuantizationError(
                f"{where}: {key.removesuffix('_scale_inv')} ({rows}x{cols}) is not a whole "
                f"number of its FP8 scale blocks (grid {grid_rows}x{grid_cols}), which "
                "transformers' dequantize needs: dequantize this source where its kernels run "
                "(load it with transformers and save_pretrained in bfloat16), then compress "
                "that copy"
            )


def dequantizing_config(config):
    """transformers' quantization config of the source with `dequantize=True`, for
    `from_pretrained(quantization_config=...)`; None for a plain source."""
    from transformers.quantizers.auto import AutoQuantizationConfig

    if method_of(config) is None:
        return None
    quantization = config.quantization_config
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    dequantizing = AutoQuantizationConfig.from_dict(dict(quantization))
    dequantizing.dequantize = True
    return dequantizing


def take_dequantizer(config):
    """The quantizer whose conversion ops dequantize the source's tensors as the shards are read
    (None for a plain source). The config loses its quantization_config, as a resident load's
    does: the model built from it holds plain tensors."""
    from transformers.quantizers.auto import AutoHfQuantizer

    dequantizing = dequantizing_config(config)
    if dequantizing is None:
        return None
    quantizer = AutoHfQuantizer.from_config(dequantizing, pre_quantized=True)
    del config.quantization_config
    return quantizer


def compute_dtype(config):
    """The dtype a dequantized source computes in by default: its config's dtype (what
    `from_pretrained(dtype="auto")` picks), float32 when the config names none."""
    import torch

    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def describe(directory: Path, prefix: str) -> dict | None:
    """The report's `model.source_quantization` before the output is written: the method, its
    scheme ("fp8 block 128x128", "mxfp4"), the stored format and the weight files' bytes; None
    for a plain source."""
    from transformers import AutoConfig

    from linearize.weights import weight_files

    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    method = method_of(config)
    if method is None:
        return None
    return {
        "method": method,
        "scheme": _scheme(method, config.quantization_config),
        "dtype": _stored_format(method, config.quantization_config),
        "bytes": sum(file.stat().st_size for file in weight_files(directory, prefix)),
    }


def complete(model_info, checkpoint: Path) -> None:
    """Add the written checkpoint's dtype and weight bytes next to the source's."""
    quantization = model_info.source_quantization
    if quantization is None:
        return
    quantization.output_dtype = model_info.dtype
    quantization.output_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))


def _field(quantization, name: str):
    if isinstance(quantization, dict):
        return quantization.get(name)
    return getattr(quantization, name, None)


def _scheme(method: str, quantization) -> str:
    if method != "fp8":
        return method
    block = _field(quantization, "weight_block_size")
    return f"fp8 block {block[0]}x{block[1]}" if block else "fp8 per tensor"


def _stored_format(method: str, quantization) -> str:
    if method == "fp8":
        return FP8_FORMATS.get(_field(quantization, "fmt") or "e4m3", DEQUANTIZABLE["fp8"])
    return DEQUANTIZABLE[method]
