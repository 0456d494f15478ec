"""The surgery, proven on every family before a compression's first pass.

Known families and discovered ones (linearize.discovery) alike: a tiny random model of the same
config (three layers, small widths) is built, and
- fold: the map T, c folded into layer 0's MLP output projection (surgery.fold_and_remove, the
  path a compression takes, removing layer 1) must turn the layer's output y into
  y - M + M T + c, where M is what the unfolded layer adds to the residual stream from its MLP
  (the projection's output times the architecture's mlp_output_scale), to float32 tolerance;
- removal: the copy with a layer removed and the rest renumbered must save_pretrained and load
  back with the auto class, with the same layer count, per-layer config lists and logits.
A fold that fails refuses the standard format (FoldError); a removal that fails refuses the
family (UnsupportedArchitectureError). Both messages are one line naming the family. So a
transformers upgrade that changes a module cannot silently break the fold.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from linearize.errors import FoldError, LinearizeError, UnsupportedArchitectureError

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # relative to the layer output's largest entry (float32 rounding is ~1e-6)
CHECK_LAYERS = 3
# Widths of the tiny model; a config whose other fields do not fit them keeps its own widths.
TINY_WIDTHS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    pad_token_id=None,
    bos_token_id=None,
    eos_token_id=None,
    # state-space mixers (falcon_h1): the reference scan is slow at the hub's sizes
    mamba_d_ssm=64,
    mamba_n_heads=8,
    mamba_d_head=8,
    mamba_d_state=16,
    mamba_chunk_size=16,
    # linear attention (qwen3_next's Gated DeltaNet) and expert widths: the hub's 512 experts
    # of width 512 would make the tiny model's three layers weigh hundreds of megabytes
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
)


@dataclass(frozen=True)
class SurgeryCheck:
    """What the check found: None where the surgery works, else why not (one line)."""

    family: str
    fold: str | None
    removal: str | None


def require_surgery(config: Any, *, fold: bool) -> SurgeryCheck:
    """Raise unless this config's family can lose a layer, and (fold=True) take a fold."""
    result = check_surgery(config)
    if result.removal:
        raise UnsupportedArchitectureError(f"{result.family}: {result.removal}")
    if fold and result.fold:
        raise FoldError(
            f"{result.family}: {result.fold}; use --format linear or --method remove instead"
        )
    return result


def check_surgery(config: Any) -> SurgeryCheck:
    """Build the tiny model and run both checks (about a second on the CPU). The verdict is
    remembered for the process: it depends only on the config and the code that ran it."""
    key = _verdict_key(config)
    if key not in _VERDICTS:
        if len(_VERDICTS) >= 64:
            _VERDICTS.clear()
        _VERDICTS[key] = _run_checks(config)
    return _VERDICTS[key]


_VERDICTS: dict[str, SurgeryCheck] = {}


def _verdict_key(config: Any) -> str:
    import json

    fields = config.to_dict()
    for name in ("_name_or_path", "linearize", "transformers_version"):
        fields.pop(name, None)
    return f"{type(config).__qualname__}:{json.dumps(fields, sort_keys=True, default=str)}"


def _run_checks(config: Any) -> SurgeryCheck:
    import torch

    from linearize.architectures import get_architecture

    family = str(config.model_type)
    get_architecture(config)  # a family whose layout cannot be found fails here
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(0)
        try:
            model = tiny_model(config)
        except LinearizeError:
            raise
        except Exception as err:  # noqa: BLE001 - any construction failure refuses the family
            raise UnsupportedArchitectureError(
                f"{family}: a tiny model of this config cannot be built ({_one_line(err)})"
            ) from None
        ids = torch.randint(0, _text_vocab_size(model.config), (1, 12))
        try:
            fold_problem, folded = _check_fold(model, ids)
        except Exception as err:  # noqa: BLE001 - a fold that cannot even run is not exact
            fold_problem, folded = f"the fold fails on a tiny model ({_one_line(err)})", None
        try:
            removed = folded if folded is not None else _removed_copy(model)
        except Exception as err:  # noqa: BLE001 - any failure here refuses the family
            return SurgeryCheck(
                family, fold_problem, f"a layer cannot be removed ({_one_line(err)})"
            )
        removal_problem = _check_reload(removed, ids)
    return SurgeryCheck(family, fold_problem, removal_problem)


def tiny_model(config: Any):
    """A float32 random model of the config with CHECK_LAYERS layers and, where the config
    takes them, small widths."""
    import torch

    from linearize.architectures import layer_config
    from linearize.discovery import shrunk_config
    from linearize.loading import model_class

    small = shrunk_config(config, layers=CHECK_LAYERS)
    for key in ("quantization_config", "linearize"):
        if hasattr(small, key):
            delattr(small, key)
    narrow = copy.deepcopy(small)
    for key, value in TINY_WIDTHS.items():  # a wrapper's vision tower keeps its own widths
        if hasattr(layer_config(narrow), key):
            setattr(layer_config(narrow), key, value)
    auto_class = model_class(config)  # a multimodal wrapper is checked whole, as it is saved
    try:
        model = auto_class.from_config(narrow, dtype="float32").eval()
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=False)
        return model
    except Exception:  # noqa: BLE001 - this family's other fields tie its widths together
        log.debug("the tiny widths do not fit %s; the check keeps the config's", config.model_type)
        return auto_class.from_config(small, dtype="float32").eval()


def _check_fold(model, ids):
    """(problem or None, the folded copy with layer 1 removed, or None if the fold refused)."""
    import torch

    from linearize.architectures import decoder_layers, get_architecture, hidden_size
    from linearize.surgery import AffineMap, OutputFold, fold_and_remove

    arch = get_architecture(model)
    d = hidden_size(model)
    layer = decoder_layers(model)[0]
    kind = arch.kind_of(layer)  # dense MLP or mixture of experts (linearize.kinds)
    y, m = _layer_output(model, layer, kind.output_module(layer), ids)
    t = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, dtype=torch.float64)
    carriers = kind.carriers(layer, model.config)
    names = ", ".join(carrier.name for carrier in carriers)
    takes_bias = any(carrier.takes_intercept and carrier.bias is not None for carrier in carriers)
    c = 0.1 * torch.randn(d, dtype=torch.float64) if takes_bias else None
    folded = copy.deepcopy(model)
    try:
        fold_and_remove(folded, {(1, 1): OutputFold(mlp=AffineMap(t, c))})
    except FoldError as err:
        return str(err).split("; use ")[0], None
    m = m * arch.mlp_output_scale(model.config)  # what reaches the residual stream
    expected = y - m + AffineMap(t, c).apply(m.double()).to(m)
    got, _ = _layer_output(folded, decoder_layers(folded)[0], None, ids)
    scale = float(expected.abs().max()) or 1.0
    error = float((got - expected).abs().max()) / scale
    if error > TOLERANCE:
        return (
            f"a map folded into {names} does not reproduce the map on the MLP output "
            f"(relative error {error:.2g} on a random input; the layer changes the MLP output "
            "after that projection)"
        ), None
    return None, folded


def _layer_output(model, layer, projection, ids):
    """(the layer's output, the projection's output) in one forward of the whole model."""
    import torch

    seen = {}

    def keep(name):
        def hook(_module, _args, output):
            seen[name] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    hooks = [layer.register_forward_hook(keep("y"))]
    if projection is not None:
        hooks.append(projection.register_forward_hook(keep("m")))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["y"], seen.get("m")


def _text_vocab_size(config) -> int:
    from linearize.architectures import layer_config

    return int(getattr(config, "vocab_size", None) or layer_config(config).vocab_size)


def _removed_copy(model):
    from linearize.surgery import remove_layers

    return remove_layers(copy.deepcopy(model), [1])


def _check_reload(model, ids) -> str | None:
    """None if the model with a layer removed saves, loads back and computes the same logits."""
    import torch

    from linearize.architectures import decoder_layers, get_architecture, layer_config, num_layers
    from linearize.loading import model_class

    arch = get_architecture(model)
    try:
        with tempfile.TemporaryDirectory(prefix="linearize-foldcheck-") as directory:
            model.save_pretrained(directory)
            auto_class = model_class(model.config)
            reloaded = auto_class.from_pretrained(directory, dtype="float32").eval()
    except Exception as err:  # noqa: BLE001 - any failure here refuses the family
        return f"a copy with a layer removed does not save and load ({_one_line(err)})"
    count = len(decoder_layers(model))
    if num_layers(reloaded) != count or len(decoder_layers(reloaded)) != count:
        return (
            f"a copy with a layer removed reloads with {num_layers(reloaded)} layers, not {count}"
        )
    for key in arch.per_layer_config_keys:
        if getattr(layer_config(reloaded), key, None) != getattr(layer_config(model), key, None):
            return f"config.{key} of a copy with a layer removed does not reload as saved"
    try:
        with torch.no_grad():
            before = model(input_ids=ids, use_cache=False).logits
            after = reloaded(input_ids=ids, use_cache=False).logits
    except Exception as err:  # noqa: BLE001 - a model whose forward fails cannot be compressed
        return f"the model's forward fails on a tiny model ({_one_line(err)})"
    if not torch.allclose(before, after, rtol=TOLERANCE, atol=TOLERANCE):
        return "a copy with a layer removed computes different logits after a save and a load"
    return None


@contextmanager
def _quiet_transformers():
    """No progress bars or warnings from the tiny model's save and load (a CLI run shows its
    own progress; the tiny model's token ids are not the user's)."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
