"""Owned forward hooks on decoder layers, streaming statistics without storing activations.

Per layer we accumulate the sufficient statistics of the pairs (x, y) = (layer input, layer
output), one row per token. Each batch is shifted by a fixed reference mean (the first batch's)
before its Gram matrices are formed in the accumulation dtype, and the batch sums are combined in
float64: the linearity scores sit at 0.999x, and naive float32 sums over many tokens lose exactly
the digits that matter. Memory is O(L * d^2) whatever the number of tokens.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


def layer_io(args: tuple, kwargs: dict, output) -> tuple[torch.Tensor, torch.Tensor]:
    """(input hidden states, output hidden states) of a decoder layer call, tuple or tensor."""
    x = args[0] if args else kwargs["hidden_states"]
    y = output[0] if isinstance(output, tuple) else output
    return x, y


@contextlib.contextmanager
def hooked(modules: dict[int, torch.nn.Module], fn: Callable) -> Iterator[None]:
    """Register fn(index, args, kwargs, output) on each module; always removed on exit."""
    handles = []
    try:
        for index, module in modules.items():
            handles.append(
                module.register_forward_hook(
                    lambda _m, a, k, o, i=index: fn(i, a, k, o), with_kwargs=True
                )
            )
        yield
    finally:
        for handle in handles:
            handle.remove()


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing after the last needed layer runs)."""


@dataclass
class PairStats:
    """Streaming statistics of row pairs x (n, d_in), y (n, d_out); fp64 combine.

    Gram matrices are of the shifted rows (x - shift_x); `centered()` turns them into the
    centred cross-products Xc^T Xc, Xc^T Yc used by every formula downstream.
    """

    d_in: int
    d_out: int
    accumulate_dtype: torch.dtype = torch.float32
    n: int = 0
    shift_x: torch.Tensor | None = None
    shift_y: torch.Tensor | None = None
    sum_x: torch.Tensor | None = None  # (d_in,) fp64, of shifted rows
    sum_y: torch.Tensor | None = None  # (d_out,)
    xx: torch.Tensor | None = None  # (d_in, d_in) fp64
    xy: torch.Tensor | None = None  # (d_in, d_out) fp64
    yy_diag: torch.Tensor | None = None  # (d_out,) fp64: diagonal of Y^T Y (shifted)
    # Paired extras, only when d_in == d_out: ||y - x||^2, ||x||^2, sum of cos(x, y).
    sq_update: float = 0.0
    sq_input: float = 0.0
    cos_sum: float = 0.0
    extras: bool = field(default=True)

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        y = y.reshape(-1, y.shape[-1])
        acc = self.accumulate_dtype
        if self.shift_x is None:
            self._init(x, y)
        xs = x.to(acc) - self.shift_x
        ys = y.to(acc) - self.shift_y
        self.n += x.shape[0]
        self.sum_x += xs.sum(0, dtype=torch.float64)
        self.sum_y += ys.sum(0, dtype=torch.float64)
        self.xx += (xs.T @ xs).double()
        self.xy += (xs.T @ ys).double()
        self.yy_diag += (ys * ys).sum(0, dtype=torch.float64)
        if self.extras and self.d_in == self.d_out:
            xf, yf = x.float(), y.float()
            self.sq_update += float((yf - xf).pow(2).sum(dtype=torch.float64))
            self.sq_input += float(xf.pow(2).sum(dtype=torch.float64))
            self.cos_sum += float(torch.nn.functional.cosine_similarity(xf, yf, dim=-1).sum())

    def _init(self, x: torch.Tensor, y: torch.Tensor) -> None:
        acc, dev = self.accumulate_dtype, x.device
        self.shift_x = x.to(acc).mean(0)
        self.shift_y = y.to(acc).mean(0)
        f64 = dict(dtype=torch.float64, device=dev)
        self.sum_x = torch.zeros(self.d_in, **f64)
        self.sum_y = torch.zeros(self.d_out, **f64)
        self.xx = torch.zeros(self.d_in, self.d_in, **f64)
        self.xy = torch.zeros(self.d_in, self.d_out, **f64)
        self.yy_diag = torch.zeros(self.d_out, **f64)

    def merge(self, other: PairStats) -> None:
        """Add another accumulator's statistics (re-shifting them onto this one's reference)."""
        if other.n == 0:
            return
        if self.n == 0 and self.shift_x is None:
            self.__dict__.update({k: _clone(v) for k, v in other.__dict__.items()})
            return
        dx = (other.shift_x - self.shift_x).double()
        dy = (other.shift_y - self.shift_y).double()
        # sum (a + d)(b + e)^T = sum ab^T + (sum a) e^T + d (sum b)^T + n d e^T
        self.xx += other.xx + torch.outer(other.sum_x, dx) + torch.outer(dx, other.sum_x)
        self.xx += other.n * torch.outer(dx, dx)
        self.xy += other.xy + torch.outer(other.sum_x, dy) + torch.outer(dx, other.sum_y)
        self.xy += other.n * torch.outer(dx, dy)
        self.yy_diag += other.yy_diag + 2 * other.sum_y * dy + other.n * dy * dy
        self.sum_x += other.sum_x + other.n * dx
        self.sum_y += other.sum_y + other.n * dy
        self.n += other.n
        self.sq_update += other.sq_update
        self.sq_input += other.sq_input
        self.cos_sum += other.cos_sum

    def centered(self) -> CenteredStats:
        """Means and centred cross-products, all float64 on the CPU."""
        n = self.n
        mx_s = self.sum_x / n  # mean of the shifted rows
        my_s = self.sum_y / n
        gram = self.xx - n * torch.outer(mx_s, mx_s)  # Xc^T Xc
        cross = self.xy - n * torch.outer(mx_s, my_s)  # Xc^T Yc
        y_var = float((self.yy_diag - n * my_s * my_s).sum())  # ||Yc||_F^2
        return CenteredStats(
            n=n,
            mean_x=(mx_s + self.shift_x.double()).cpu(),
            mean_y=(my_s + self.shift_y.double()).cpu(),
            gram=gram.cpu(),
            cross=cross.cpu(),
            y_sq=y_var,
        )


def _clone(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


@dataclass
class CenteredStats:
    n: int
    mean_x: torch.Tensor  # (d_in,)
    mean_y: torch.Tensor  # (d_out,)
    gram: torch.Tensor  # G = Xc^T Xc  (d_in, d_in)
    cross: torch.Tensor  # C = Xc^T Yc  (d_in, d_out)
    y_sq: float  # ||Yc||_F^2


def accumulation_dtype(model_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """fp32 Gram matrices for every model dtype; batch sums are combined in fp64 regardless."""
    return torch.float32


def iterate_batches(windows: torch.Tensor, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, len(windows), batch_size):
        yield start, windows[start : start + batch_size]


def run_decoder(model, input_ids: torch.Tensor) -> None:
    """A forward of the decoder stack only (no LM head), without a KV cache."""
    device = next(model.parameters()).device
    with contextlib.suppress(StopForward):
        model.base_model(input_ids=input_ids.to(device), use_cache=False)


def reservoir_positions(n_tokens: int, size: int, seed: int) -> torch.Tensor:
    """Sorted flat token positions of a uniform random sample (the TwoNN reservoir)."""
    generator = torch.Generator().manual_seed(seed)
    size = min(size, n_tokens)
    return torch.randperm(n_tokens, generator=generator)[:size].sort().values


@dataclass
class LayerCapture:
    stats: list[PairStats]
    reservoir: list[torch.Tensor] | None  # per layer: sampled input rows (R, d), float32 CPU
    tokens: int


@torch.no_grad()
def collect_layer_stats(
    model,
    layers: torch.nn.ModuleList,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    reservoir_size: int = 0,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> LayerCapture:
    """One streaming pass: PairStats of every decoder layer, plus an optional token reservoir."""
    d = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    acc = accumulation_dtype(next(model.parameters()).dtype, windows.device)
    stats = [PairStats(d, d, accumulate_dtype=acc) for _ in layers]
    seq_len = windows.shape[1]
    positions = (
        reservoir_positions(windows.numel(), reservoir_size, seed) if reservoir_size else None
    )
    reservoir: list[list[torch.Tensor]] = [[] for _ in layers]
    batch_rows: torch.Tensor | None = None

    def on_layer(index, args, kwargs, output):
        x, y = layer_io(args, kwargs, output)
        stats[index].update(x, y)
        if batch_rows is not None and len(batch_rows):
            reservoir[index].append(x.reshape(-1, d)[batch_rows.to(x.device)].float().cpu())

    with hooked(dict(enumerate(layers)), on_layer):
        for start, batch in iterate_batches(windows, batch_size):
            if positions is not None:
                lo, hi = start * seq_len, (start + len(batch)) * seq_len
                in_batch = positions[(positions >= lo) & (positions < hi)]
                batch_rows = in_batch - lo
            run_decoder(model, batch)
            if on_batch is not None:
                on_batch(len(batch))
    kept = [torch.cat(rows) for rows in reservoir] if positions is not None else None
    return LayerCapture(stats=stats, reservoir=kept, tokens=windows.numel())
