"""The decoder layer is the unit of execution: a causal LM run one layer at a time.

Every stage (analysis, fit, healing targets, evaluation) is a pass that carries the hidden states
of its windows through the decoder layers in order: layer i is made resident, every batch of every
window set goes through it, observers see (input, output) of that layer, the outputs overwrite
the inputs in the activation cache (linearize.activations), and layer i is released before layer
i + 1 is read. Weights are therefore transferred once per pass, never per batch.

Two placements of the same code:
- resident: every tensor was loaded up front; `prepare` and `release` do nothing.
- streamed: the model is a skeleton whose decoder layers sit on the `meta` device; `prepare(i)`
  reads layer i's tensors from the safetensors shards (linearize.weights) and `release(i)` drops
  them. The trunk (input embeddings, final norm, rotary tables) stays resident; an untied output
  head is read for each head step and dropped after. A layer the job changed (a fold target, a
  healed layer, a linear block) is *kept*: it is never re-read from the shards again, and waits
  in host memory between passes when the device is a GPU.

How each layer is called: a layer's forward needs what the model computes before its loop
(attention masks, rotary position embeddings, position ids), and per position (sliding or full
attention). The model's own forward is run once per batch shape with every layer swapped for a
`_Catcher` that records the arguments it is called with and passes the hidden states through;
those recorded calls are replayed for each layer. The same trick with an injected tensor at
position 0 applies the model's own final norm to a hidden state (`finalize`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from linearize.architectures import (
    decoder_layers,
    get_architecture,
    hidden_size,
    layer_config,
    text_model,
)

log = logging.getLogger(__name__)

HEAD_CHUNK_BYTES = 256 * 2**20  # logits of one head step: rows x vocabulary x 4 bytes at most
_LAYER_ATTRIBUTES = ("attention_type", "layer_type", "is_sliding", "sliding_window")


@dataclass
class Stream:
    """A set of windows (token ids, (n, S)) and their hidden states at the current layer."""

    ids: torch.Tensor
    cache: object  # ActivationCache
    seconds: float = 0.0  # time spent running this stream's batches (throughput)


@dataclass
class LayerStack:
    """A causal LM, its placement, and the layer-at-a-time operations every stage uses."""

    model: nn.Module
    device: torch.device
    weights: object | None = None  # ShardedWeights when streamed; None when resident
    batch_size: int = 4
    head_step_rows: int | None = None  # positions per head step (the memory plan's), else bytes
    current: tuple[str, slice] | None = None  # (stream, rows) of the batch being run
    _calls: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, model: nn.Module, batch_size: int = 4) -> LayerStack:
        """A resident stack of an already loaded model (tests, benchmarks, plain helpers)."""
        return cls(model=model, device=next(model.parameters()).device, batch_size=batch_size)

    # --- placement -------------------------------------------------------------------------

    def __post_init__(self) -> None:
        if self.weights is not None:
            tune_host_allocator()

    @property
    def streamed(self) -> bool:
        return self.weights is not None

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def prepare(self, index: int) -> nn.Module:
        """Layer `index` with its weights on the device (read from the shards if streamed)."""
        layer = self.layers[index]
        if self.streamed:
            if _has_meta(layer) and layer_source(layer) is None:
                raise RuntimeError(f"layer {index} was dropped; this stack cannot run any more")
            if _has_meta(layer):  # first use, or released: read it (again) from the shards
                load_module(layer, layer_source(layer), self.weights, self.device, self.dtype)
            else:  # a kept layer waiting in host memory
                layer.to(self.device)
        return layer

    def release(self, index: int) -> None:
        layer = self.layers[index]
        if not self.streamed:
            return
        if is_kept(layer):
            layer.to("cpu")  # a changed layer is never re-read: it waits in host memory
        else:
            layer.to("meta")
        return_freed_memory()

    def drop(self) -> None:
        """Free every layer, the kept ones too: for a streamed job whose checkpoint is written,
        so that the reloaded checkpoint is measured without this copy's changed layers. The
        stack cannot run afterwards."""
        if not self.streamed:
            return
        for layer in self.layers:
            layer._linearize_kept = False
            layer._linearize_source = None  # nothing to re-read it from: `prepare` refuses
            layer.to("meta")
        return_freed_memory()

    def keep(self, module: nn.Module) -> None:
        """Mark a layer the job changed: from now on it lives in memory, not in the shards."""
        module._linearize_kept = True

    @contextlib.contextmanager
    def resident(self, index: int) -> Iterator[nn.Module]:
        layer = self.prepare(index)
        try:
            yield layer
        finally:
            self.release(index)

    @contextlib.contextmanager
    def output_head(self) -> Iterator[nn.Module]:
        """The output embedding (LM head) on the device for one head step."""
        head = self.model.get_output_embeddings()
        loaded = self.streamed and _has_meta(head)
        if loaded:
            load_module(
                head, module_prefix(self.model, head), self.weights, self.device, self.dtype
            )
        try:
            yield head
        finally:
            if loaded:
                head.to("meta")

    # --- calling layers ------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering layer 0 for `ids` (B, S); records the layers' call arguments."""
        catcher = _CallRecorder(len(self.layers))
        with self._catchers(catcher):
            text_model(self.model)(input_ids=ids.to(self.device), use_cache=False)
        self._calls[tuple(ids.shape)] = catcher.calls
        return catcher.first_input

    def call(self, index: int, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Run `layer` as position `index` of the model on hidden (B, S, d)."""
        key = tuple(hidden.shape[:2])
        if key not in self._calls:
            self.embed(torch.zeros(key, dtype=torch.long))
        args, kwargs = self._calls[key][index]
        out = layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def finalize(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's final norm (and any projection after it) applied to hidden (B, S, d)."""
        catcher = _CallRecorder(len(self.layers), inject=hidden)
        dummy = torch.zeros(hidden.shape[:2], dtype=torch.long, device=self.device)
        with self._catchers(catcher):
            out = text_model(self.model)(input_ids=dummy, use_cache=False)
        return out.last_hidden_state

    def logits(self, head: nn.Module, final: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states (rows, d); Gemma's soft cap applied as the model does."""
        logits = head(final).float()
        cap = getattr(layer_config(self.model), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def head_rows(self, vocab: int) -> int:
        """Token positions per head step: the memory plan's, else what keeps a step's logits
        under HEAD_CHUNK_BYTES."""
        if self.head_step_rows:
            return self.head_step_rows
        return max(1, HEAD_CHUNK_BYTES // (4 * vocab))

    @contextlib.contextmanager
    def _catchers(self, recorder: _CallRecorder):
        from linearize.surgery import unpacks_layer_outputs

        arch = get_architecture(self.model)
        parent_path, _, attr = arch.layers_path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        layers = getattr(parent, attr)
        unpacks = unpacks_layer_outputs(self.model)
        stand_ins = nn.ModuleList(
            _Catcher(i, recorder, layer, unpacks) for i, layer in enumerate(list(layers))
        )
        setattr(parent, attr, stand_ins)
        try:
            yield
        finally:
            setattr(parent, attr, layers)

    # --- passes --------------------------------------------------------------------------------

    def open_streams(self, planner, windows: dict[str, torch.Tensor]) -> dict[str, Stream]:
        """Embed each window set into a fresh activation cache (the input of layer 0)."""
        d = hidden_size(self.model)
        streams = {}
        for name, ids in windows.items():
            cache = planner.allocate(len(ids), ids.shape[1], d, self.dtype)
            streams[name] = Stream(ids, cache)
            for rows in batches(len(ids), self.batch_size):
                cache[rows] = self.embed(ids[rows])
        return streams

    @torch.no_grad()
    def run(
        self,
        streams: dict[str, Stream],
        visitor=None,
        *,
        first: int = 0,
        last: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        """Carry every stream through layers first..last (inclusive), one layer at a time.

        `visitor` may define layer_start(i, layer), batch(i, name, rows, x, y),
        stream_end(i, name) and layer_end(i, layer); each is called when it happens.
        """
        last = len(self.layers) - 1 if last is None else last
        for index in range(first, last + 1):
            with self.resident(index) as layer:
                _visit(visitor, "layer_start", index, layer)
                for name, stream in streams.items():
                    self._run_stream(index, layer, name, stream, visitor, on_batch)
                    _visit(visitor, "stream_end", index, name)
                    if self.streamed:  # the statistics a stream end reduces leave heap holes
                        return_freed_memory()
                _visit(visitor, "layer_end", index, layer)

    def _run_stream(self, index, layer, name, stream, visitor, on_batch) -> None:
        for rows in batches(len(stream.ids), self.batch_size):
            started = time.perf_counter()
            self.current = (name, rows)
            x = stream.cache[rows]
            y = self.call(index, layer, x)
            _visit(visitor, "batch", index, name, rows, x, y)
            stream.cache[rows] = y
            stream.seconds += time.perf_counter() - started
            if on_batch is not None:
                on_batch(rows.stop - rows.start)

    @torch.no_grad()
    def run_head(self, streams: dict[str, Stream], on_logits, on_batch=None) -> None:
        """Final norm and LM head over each stream's last hidden states, in row chunks.

        on_logits(name, window, start, logits) gets the logits (n, V) of positions
        start..start + n - 1 of one window; the whole set's logits never exist at once.
        """
        with self.output_head() as head:
            step = self.head_rows(head.weight.shape[0])
            for name, stream in streams.items():
                for rows in batches(len(stream.ids), self.batch_size):
                    started = time.perf_counter()
                    final = self.finalize(stream.cache[rows])  # (B, S, d)
                    for offset, window in enumerate(range(rows.start, rows.stop)):
                        for start in range(0, final.shape[1], step):
                            chunk = final[offset, start : start + step]
                            on_logits(name, window, start, self.logits(head, chunk))
                    stream.seconds += time.perf_counter() - started
                    if on_batch is not None:
                        on_batch(rows.stop - rows.start)


def as_stack(model_or_stack) -> LayerStack:
    """A resident LayerStack for a plain loaded model; a stack is returned as it is."""
    if isinstance(model_or_stack, LayerStack):
        return model_or_stack
    return LayerStack.of(model_or_stack)


def batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _visit(visitor, method: str, *args) -> None:
    fn = getattr(visitor, method, None)
    if fn is not None:
        fn(*args)


class _CallRecorder:
    def __init__(self, n_layers: int, inject: torch.Tensor | None = None):
        self.calls: list[tuple[tuple, dict]] = [((), {})] * n_layers
        self.first_input: torch.Tensor | None = None
        self.inject = inject


class _Catcher(nn.Module):
    """Stands in for decoder layer `position`: records its call, passes the hidden states on."""

    def __init__(
        self, position: int, recorder: _CallRecorder, layer: nn.Module, tuple_output: bool
    ):
        super().__init__()
        self.position, self.recorder = position, recorder
        for name in _LAYER_ATTRIBUTES:
            if hasattr(layer, name):
                setattr(self, name, getattr(layer, name))
        self.tuple_output = tuple_output  # the model unpacks the layer's output with [0]

    def forward(self, hidden_states, *args, **kwargs):
        self.recorder.calls[self.position] = (args, kwargs)
        if self.position == 0:
            self.recorder.first_input = hidden_states
            if self.recorder.inject is not None:
                hidden_states = self.recorder.inject.to(hidden_states.dtype)
        return (hidden_states,) if self.tuple_output else hidden_states


# --- streamed weights ---------------------------------------------------------------------------


def return_freed_memory() -> None:
    """Hand the host allocator's free pages back to the OS (glibc's malloc_trim).

    A released layer's tensors are a few MB each; glibc serves such sizes from its heap once its
    mmap threshold has grown, and keeps freed heap pages, so without this the resident set grew
    with every layer a streamed pass read (+160 MB from 8 to 16 layers at d = 1024)."""
    if _GLIBC:
        _GLIBC.malloc_trim(0)


# glibc's mallopt parameters (malloc.h) and the values a streamed job sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
STREAMED_MMAP_THRESHOLD = 256 * 1024


def tune_host_allocator() -> None:
    """Once per process, before a streamed job: fixed glibc mmap and trim thresholds.

    glibc raises its mmap threshold to the size of the largest block freed (up to 32 MB), after
    which a layer's tensors and each batch's activations come from heaps that keep freed pages
    per thread arena. Fixing the thresholds (which also turns the raise off) gives blocks from
    256 kB up their own mapping, returned on free: the analysis pass of a 400 MB model under a
    100 MB budget peaked at 622 MiB instead of 736-798 (bench/RESULTS.md)."""
    global _GLIBC
    if _GLIBC is None:
        _GLIBC = _load_glibc() or False
        if _GLIBC:
            _GLIBC.mallopt(_M_MMAP_THRESHOLD, STREAMED_MMAP_THRESHOLD)
            _GLIBC.mallopt(_M_TRIM_THRESHOLD, STREAMED_MMAP_THRESHOLD)


def _load_glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018  (not glibc: macOS, musl)
    except (OSError, AttributeError):
        return None
    return libc


_GLIBC = None  # the C library once a streamed stack asked for it; False where it is not glibc


def is_kept(module: nn.Module) -> bool:
    return bool(getattr(module, "_linearize_kept", False)) or layer_source(module) is None


def layer_source(module: nn.Module) -> str | None:
    """The key prefix of this layer's tensors in the shards it was opened from."""
    return getattr(module, "_linearize_source", None)


def module_prefix(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return f"{name}." if name else ""
    raise ValueError("module is not part of the model")


def _has_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def load_module(module: nn.Module, prefix: str, weights, device, dtype) -> None:
    """Replace the meta tensors of `module` by those named `prefix + name` in the shards."""
    names = [n for n, t in module.state_dict(keep_vars=True).items() if t.is_meta]
    tensors = weights.read([weights.shard_key(prefix + n) for n in names])
    state = {}
    for name in names:
        tensor = tensors[weights.shard_key(prefix + name)]
        state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
    module.load_state_dict(state, strict=False, assign=True)
    for param in module.parameters():
        param.requires_grad_(False)
    module.to(device)
