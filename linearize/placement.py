"""Resident or streamed: open a model as a LayerStack that fits the memory budget.

`open_stack` reads the checkpoint's shard headers (no tensor data), compares what the job would
hold with everything resident against the budget, and then either loads the whole model (the
regular transformers path) or builds a skeleton whose decoder layers stay in the shards until a
pass needs them (linearize.stack). The memory plan (linearize.memory_plan) is made here too,
before any tensor is read: a budget too small for the least the job needs is refused then.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

from linearize import quantization
from linearize.errors import InputError, LinearizeError, ModelSourceError

log = logging.getLogger(__name__)

STREAMING_MODES = ("auto", "on", "off")
# What a pass holds besides weights and caches (per-layer Grams, head chunks, allocator slack),
# as a share of the budget: a model is streamed unless it fits in the rest.
WORKING_MARGIN = 0.25


@dataclass
class Placement:
    mode: str  # resident | streamed
    budget_bytes: int
    weight_bytes: int
    largest_layer_bytes: int
    trunk_bytes: int
    reason: str
    head_bytes: int = 0
    plan: object = None  # linearize.memory_plan.MemoryPlan
    start_memory: int | None = None  # the process before any weight (memory.current_bytes)

    def as_dict(self) -> dict:
        return {**self.__dict__, "plan": self.plan.as_dict() if self.plan else None}


def open_stack(
    source: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    use_cache: bool = True,
    streaming: str = "auto",
    memory_budget: str | int = "auto",
    activation_tokens: int = 0,
    workload=None,
):
    """(LoadedModel with a `.stack`, Placement) for any supported model source. `workload`
    (linearize.memory_plan.Workload) sizes the memory plan; the stack follows it."""
    from linearize.loading import load_model, resolve_device
    from linearize.memory import current_bytes, resolve_budget

    if streaming not in STREAMING_MODES:
        raise InputError(f"--streaming must be one of {', '.join(STREAMING_MODES)}")
    device = resolve_device(device)
    budget = resolve_budget(memory_budget, device)
    directory, prefix = weights_directory(source, dtype=dtype, use_cache=use_cache)
    sizes = checkpoint_sizes(directory, prefix, dtype)
    start = current_bytes(device)  # the model's code is imported, no weight is read yet
    activation_bytes = activation_tokens * sizes["hidden"] * sizes["itemsize"]
    placement = choose(streaming, budget, sizes, activation_bytes)
    if streaming == "auto" and placement.mode == "resident":
        placement = stream_unless_planned(placement, sizes, workload)
    placement.plan = make_plan(placement, sizes, workload)
    placement.start_memory = start
    log.info("placement: %s (%s)", placement.mode, placement.reason)
    if placement.mode == "resident":
        loaded = load_model(source, dtype=dtype, device=device, use_cache=use_cache)
        loaded.stack = _resident_stack(loaded.model, device)
    else:
        loaded = _open_streamed(source, directory, prefix, dtype, device)
    follow_plan(loaded.stack, placement.plan)
    loaded.source_quantization = quantization.describe(directory, prefix)
    return loaded, placement


def stream_unless_planned(placement: Placement, sizes: dict, workload) -> Placement:
    """Resident only when the memory plan's least with every layer in memory fits too."""
    from linearize.memory import format_size
    from linearize.memory_plan import least_plan

    least = least_plan(model_shape(sizes), _work(sizes, workload), placement.budget_bytes, False)
    if least.total <= placement.budget_bytes:
        return placement
    placement.mode = "streamed"
    placement.reason = (
        f"the memory plan with every layer resident ({format_size(least.total)}) exceeds the budget"
    )
    return placement


def _work(sizes: dict, workload):
    from linearize.memory_plan import Workload

    return workload or Workload(seq_len=sizes["max_positions"], activation_tokens=0)


def make_plan(placement: Placement, sizes: dict, workload):
    """The memory plan of this placement (refuses a streamed job whose least does not fit)."""
    from linearize.memory_plan import plan_memory

    streamed = placement.mode == "streamed"
    return plan_memory(model_shape(sizes), _work(sizes, workload), placement.budget_bytes,
                       streamed=streamed)  # fmt: skip


def model_shape(sizes: dict):
    """The memory plan's view of checkpoint_sizes."""
    from linearize.memory_plan import ModelShape

    return ModelShape(
        hidden=sizes["hidden"],
        ffn=sizes["ffn"],
        heads=sizes["heads"],
        vocab=sizes["vocab"],
        itemsize=sizes["itemsize"],
        weight_bytes=sizes["total"],
        largest_layer_bytes=sizes["largest_layer"],
        trunk_bytes=sizes["trunk"],
        head_bytes=sizes["head"],
        carrier_bytes=sizes["carriers"],
    )


def follow_plan(stack, plan) -> None:
    """The batch size and head step the plan chose."""
    stack.batch_size = plan.batch_size
    stack.head_step_rows = plan.head_rows


def choose(streaming: str, budget: int, sizes: dict, activation_bytes: int) -> Placement:
    def placement(mode: str, reason: str) -> Placement:
        return Placement(
            mode=mode,
            budget_bytes=budget,
            weight_bytes=sizes["total"],
            largest_layer_bytes=sizes["largest_layer"],
            trunk_bytes=sizes["trunk"],
            head_bytes=sizes["head"],
            reason=reason,
        )

    from linearize.memory import format_size

    need = sizes["total"] + activation_bytes
    fits = need <= budget * (1 - WORKING_MARGIN)
    if streaming == "on":
        return placement("streamed", "--streaming on")
    if streaming == "off":
        return placement("resident", "--streaming off")
    if fits:
        return placement("resident", f"weights and activations ({format_size(need)}) fit")
    return placement(
        "streamed", f"weights and activations ({format_size(need)}) exceed the budget's 75%"
    )


def checkpoint_sizes(directory: Path, prefix: str, dtype: str) -> dict:
    """Bytes of the whole checkpoint, its largest decoder layer, the trunk and an untied head,
    in the dtype the job will run in (from the shard headers only)."""
    from transformers import AutoConfig

    from linearize.architectures import get_architecture, hidden_size, num_layers
    from linearize.loading import torch_dtype
    from linearize.weights import ShardedWeights

    weights = ShardedWeights.open(directory, prefix)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    quantization.refuse_unsupported(config, directory)
    quantization.refuse_partial_blocks(
        config, {key: entry.shape for key, entry in weights.entries.items()}, directory
    )
    get_architecture(config)  # an unsupported family is refused before the skeleton is built
    dequantizer = quantization.take_dequantizer(config)
    skeleton = _skeleton(config)
    weights.bind(skeleton, dequantizer)
    model_names, layers_prefix, head_prefix = _model_names(weights, skeleton)
    target = torch_dtype(dtype)
    if dequantizer is not None:  # sized as the plain tensors they are read into
        run_dtype = target or quantization.compute_dtype(config)
        sizes = {name: t.numel() * run_dtype.itemsize for name, t in _tensors(skeleton)}
    else:
        sizes = {key: _size(entry, target) for key, entry in weights.entries.items()}

    per_layer = [0] * num_layers(config)
    trunk = head = 0
    for key, nbytes in sizes.items():
        name = model_names.get(key, key)
        position = name[len(layers_prefix) :].split(".", 1)[0]
        if name.startswith(layers_prefix) and position.isdigit() and int(position) < len(per_layer):
            per_layer[int(position)] += nbytes
        elif name.startswith(head_prefix):
            head += nbytes
        else:
            trunk += nbytes
    if target is None:
        target = quantization.compute_dtype(config) if dequantizer else _checkpoint_dtype(weights)
    itemsize = target.itemsize
    largest = max(per_layer, default=0)
    return {
        "hidden": hidden_size(config),
        "itemsize": itemsize,
        "total": sum(per_layer) + trunk + head,
        "largest_layer": largest,
        "trunk": trunk,
        "head": head,
        **config_shape(config, itemsize, largest),
    }


def config_shape(config, itemsize: int, largest_layer: int) -> dict:
    """What the memory plan reads from the config: MLP width, heads, vocabulary, positions,
    and the bytes healing trains in the fold target (its attention output and MLP down
    projections; for experts a third of the layer, which bounds them from above)."""
    from linearize.architectures import hidden_size, layer_config

    text = layer_config(config)
    d = hidden_size(config)
    ffn = getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) or 4 * d
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None) or 1
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None) or 1
    positions = getattr(text, "max_position_embeddings", None) or 2048
    carriers = max((d * d + d * ffn) * itemsize, largest_layer // 3)
    return {"ffn": ffn, "heads": heads, "vocab": vocab, "max_positions": positions,
            "carriers": min(carriers, largest_layer)}  # fmt: skip


_FLOAT_NAMES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def _size(entry, target) -> int:
    """A shard tensor's bytes once cast to `target` (None: as stored)."""
    if target is None or entry.dtype not in _FLOAT_NAMES:
        return entry.nbytes
    return entry.nbytes // _FLOAT_NAMES[entry.dtype] * target.itemsize


def _skeleton(config):
    """The model of `config` built on `meta` (no memory)."""
    from accelerate import init_empty_weights

    from linearize.checkpoint import install_recorded_linear_blocks
    from linearize.loading import model_class

    with init_empty_weights(include_buffers=False):
        skeleton = model_class(config).from_config(config)
        install_recorded_linear_blocks(skeleton)
    return skeleton


def _tensors(model):
    """(name, tensor) of every parameter and buffer, tied ones once."""
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield name, tensor


def _model_names(weights, skeleton) -> tuple[dict[str, str], str, str]:
    """The model's name of each shard tensor (hub layouts differ from the model's own, e.g. a
    wrapper's `language_model.model.layers.N.`), the layers' and the output head's prefixes.

    Names come from the conversion mapping transformers applies on load, bound (`weights.bind`)
    on a skeleton built on `meta`."""
    from linearize.architectures import get_architecture
    from linearize.stack import module_prefix

    names = {key: model for model, key in weights.aliases.items()}
    for model, (_, parts) in weights.conversions.items():  # e.g. per-expert tensors, fused
        names.update(dict.fromkeys((key for _, key in parts), model))
    head = module_prefix(skeleton, skeleton.get_output_embeddings())
    return names, get_architecture(skeleton.config).layers_path + ".", head


def weights_directory(source: str, *, dtype: str, use_cache: bool) -> tuple[Path, str]:
    """The safetensors directory behind a model source, and its weight-file prefix.

    A GGUF file (or the bundled alias) is converted into the cache first; a hub id is resolved
    through the standard HF cache (HF_HUB_OFFLINE=1 works from a populated one).
    """
    from linearize import cache
    from linearize.checkpoint import LINEAR_WEIGHTS_PREFIX, read_manifest
    from linearize.loading import BUNDLED_ALIASES, bundled_gguf_path, load_model

    if source in BUNDLED_ALIASES or source.endswith(".gguf"):
        path = bundled_gguf_path(source) if source in BUNDLED_ALIASES else Path(source)
        if not path.is_file():
            raise ModelSourceError(f"GGUF file not found: {path}")
        key = cache.gguf_key(path)
        converted = cache.converted_gguf_dir(key)
        if converted is None:
            if not use_cache:
                raise InputError("streaming a GGUF model needs its converted copy: drop --no-cache")
            load_model(source, dtype=dtype, device="cpu", use_cache=True)  # converts once
            converted = cache.converted_gguf_dir(key)
        if converted is None:
            raise LinearizeError(f"the converted copy of {path} could not be written to the cache")
        return converted, "model"
    path = Path(source).expanduser()
    if path.is_dir():
        manifest = read_manifest(path)
        linear = manifest is not None and manifest["format"] == "linear"
        return path, LINEAR_WEIGHTS_PREFIX if linear else "model"
    if source.startswith((".", "/", "~")) or path.suffix:
        raise ModelSourceError(f"model path not found: {source}")
    _refuse_before_download(source)
    return _hub_snapshot(source), "model"


def _refuse_before_download(repo_id: str) -> None:
    """A hub model stored in a quantization that cannot be read here is refused from its
    config.json alone, before its weights are fetched."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(repo_id, trust_remote_code=False)
    except (OSError, ValueError):
        return  # the snapshot reports what is wrong with the source
    quantization.refuse_unsupported(config, repo_id)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]
            )
        )
    except Exception as err:  # noqa: BLE001 - any hub failure is a bad model source here
        raise ModelSourceError(f"cannot resolve {repo_id!r} to local safetensors: {err}") from err


def _resident_stack(model, device: str):
    import torch

    from linearize.stack import LayerStack

    return LayerStack(model=model, device=torch.device(device))


def _open_streamed(source: str, directory: Path, prefix: str, dtype: str, device: str):
    """A skeleton on `meta` whose trunk is read now and whose layers are read per pass."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    from linearize.architectures import decoder_layers, get_architecture
    from linearize.checkpoint import install_recorded_linear_blocks
    from linearize.loading import (
        BUNDLED_ALIASES,
        LoadedModel,
        load_tokenizer,
        model_class,
        torch_dtype,
    )
    from linearize.stack import LayerStack
    from linearize.weights import ShardedWeights

    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    weights = ShardedWeights.open(directory, prefix)
    dequantizer = quantization.take_dequantizer(config)
    # A dequantized source computes in its config's dtype, as a resident load of it does.
    default = quantization.compute_dtype(config) if dequantizer else _checkpoint_dtype(weights)
    run_dtype = torch_dtype(dtype) or default
    with init_empty_weights(include_buffers=False):
        model = model_class(config).from_config(config, dtype=run_dtype)
        install_recorded_linear_blocks(model)
    weights.bind(model, dequantizer)
    layers_path = get_architecture(model).layers_path
    for index, layer in enumerate(decoder_layers(model)):
        layer._linearize_source = f"{layers_path}.{index}."
    stack = LayerStack(model=model.eval(), device=torch.device(device), weights=weights)
    load_trunk(stack)
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    gguf = source in BUNDLED_ALIASES or source.endswith(".gguf")  # its files are ours, not copies
    loaded = LoadedModel(model, load_tokenizer(directory), source, "streamed")
    loaded.files_dir = None if gguf else directory
    loaded.source_config = copy.deepcopy(model.config)
    loaded.stack = stack
    return loaded


def load_trunk(stack) -> None:
    """Read every tensor outside the decoder layers and the output head; re-tie the head."""
    from linearize.architectures import get_architecture

    model = stack.model
    layers_prefix = get_architecture(model).layers_path + "."
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    for name, module in model.named_modules():
        if name.startswith(layers_prefix) or name + "." == layers_prefix:
            continue
        if module is head and not tied:
            continue
        own = {n: t for n, t in module.named_parameters(recurse=False)}
        own.update(dict(module.named_buffers(recurse=False)))
        if any(t.is_meta for t in own.values()):
            _load_own(module, f"{name}." if name else "", stack)
    if tied or getattr(model.config, "tie_word_embeddings", False):
        head.weight = model.get_input_embeddings().weight


def _load_own(module, prefix: str, stack) -> None:
    """Load the meta tensors a module holds itself (not its children's)."""
    import torch

    names = [
        n
        for n, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if t.is_meta
    ]
    keys = {n: stack.weights.shard_key(prefix + n) for n in names}
    present = {n: k for n, k in keys.items() if k in stack.weights}
    tensors = stack.weights.read(present.values())
    state = {}
    for name, key in present.items():
        tensor = tensors[key]
        floating = tensor.is_floating_point()
        state[name] = tensor.to(device=stack.device, dtype=stack.dtype if floating else None)
    for name, tensor in state.items():
        if name in module._parameters:
            module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[name] = tensor


def _checkpoint_dtype(weights):
    import torch

    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for entry in weights.entries.values():
        if entry.dtype in names:
            return names[entry.dtype]
    return torch.float32
