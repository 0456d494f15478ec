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

from linearize.architectures import hidden_size, text_model

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


# Model dtypes whose values multiply exactly in float32 (8 or 11 significant bits each, so a
# product has at most 22 <= 24): their Grams are formed from the raw values by one GEMM with
# float32 output, with no shift (see PairStats.update).
_EXACT_PRODUCT_DTYPES = (torch.bfloat16, torch.float16)
GRAM_BLOCKS = 4  # column blocks of X^T X; only the upper ones are multiplied (see _add_grams)


@dataclass
class PairStats:
    """Streaming statistics of row pairs x (n, d_in), y (n, d_out); fp64 combine.

    Gram matrices are of the shifted rows (x - shift_x); `centered()` turns them into the
    centred cross-products Xc^T Xc, Xc^T Yc used by every formula downstream.

    accumulate_dtype says how a batch's Grams are formed before the fp64 combine:
    - float32 / float64: rows shifted by the first batch's mean in that dtype, then a GEMM in it.
    - bfloat16 / float16 (half-precision models): the raw rows in that dtype, GEMMs with float32
      output (products exact, fp32 sums within one batch), shift 0. A shift in bf16 would round
      x - shift; on SmolLM2 bf16 activations (8k tokens, 6 layers) the unshifted path is within
      3e-5 of fp64 in 1 - score, a bf16 shift up to 3e-4, the fp32 shifted path up to 5e-4.
      On CUDA the rows are never copied to float32 (torch.mm(..., out_dtype=torch.float32)).
    Both paths form X^T X from its upper block rows only (see _add_grams).
    No statistic leaves the device during update(): the paired extras are device tensors, read
    (one sync) through the sq_update / sq_input / cos_sum properties.
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
    # Paired extras, only when d_in == d_out: ||y - x||^2, ||x||^2, sum of cos(x, y), fp64.
    extra_sums: torch.Tensor | None = None  # (3,) on the rows' device
    extras: bool = field(default=True)

    @property
    def raw_rows(self) -> bool:
        """Whether batch Grams are formed from unshifted half-precision rows (see class doc)."""
        return self.accumulate_dtype in _EXACT_PRODUCT_DTYPES

    @property
    def sq_update(self) -> float:
        return self._extra(0)

    @property
    def sq_input(self) -> float:
        return self._extra(1)

    @property
    def cos_sum(self) -> float:
        return self._extra(2)

    def _extra(self, i: int) -> float:
        return 0.0 if self.extra_sums is None else float(self.extra_sums[i])

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])  # (n, d_in)
        y = y.reshape(-1, y.shape[-1])  # (n, d_out)
        acc = self.accumulate_dtype
        if self.shift_x is None:
            self._init(x, y)
        self.n += x.shape[0]
        if self.raw_rows:
            xs, ys = x.to(acc), y.to(acc)
            self._add_grams(xs, ys, gram_fp32)
            self.yy_diag.add_(torch.linalg.vector_norm(ys, dim=0, dtype=torch.float64).square())
        else:
            xs = x.to(acc) - self.shift_x
            ys = y.to(acc) - self.shift_y
            self._add_grams(xs, ys, lambda a, b: a.T @ b)
            self.yy_diag.add_((ys * ys).sum(0, dtype=torch.float64))
        self.sum_x.add_(xs.sum(0, dtype=torch.float64))
        self.sum_y.add_(ys.sum(0, dtype=torch.float64))
        if self.extras and self.d_in == self.d_out:
            self.extra_sums.add_(paired_sums(x, y))

    def _add_grams(self, xs: torch.Tensor, ys: torch.Tensor, mm: Callable) -> None:
        """xx += Xs^T Xs, xy += Xs^T Ys, with mm(a, b) = a^T b; the batch products go to fp64.

        Xs^T Xs is symmetric: with the columns in GRAM_BLOCKS blocks, block row i is formed from
        column i onwards only, and the part below the diagonal is its transpose. Four blocks take
        10/16 of the multiply-adds of the full product (1.625 d^2 per row with X^T Y, not 2 d^2).
        """
        d = self.d_in
        step = -(-d // GRAM_BLOCKS)
        for lo in range(0, d, step):
            hi = min(lo + step, d)
            band = mm(xs[:, lo:hi], xs[:, lo:])  # (hi - lo, d - lo): rows lo:hi, columns lo:
            self.xx[lo:hi, lo:].add_(band)
            self.xx[hi:, lo:hi].add_(band[:, hi - lo :].T)
        self.xy.add_(mm(xs, ys))

    def _init(self, x: torch.Tensor, y: torch.Tensor) -> None:
        acc, dev = self.accumulate_dtype, x.device
        if self.raw_rows:
            self.shift_x = torch.zeros(self.d_in, dtype=acc, device=dev)
            self.shift_y = torch.zeros(self.d_out, dtype=acc, device=dev)
        else:
            self.shift_x = x.to(acc).mean(0)
            self.shift_y = y.to(acc).mean(0)
        f64 = dict(dtype=torch.float64, device=dev)
        self.sum_x = torch.zeros(self.d_in, **f64)
        self.sum_y = torch.zeros(self.d_out, **f64)
        self.xx = torch.zeros(self.d_in, self.d_in, **f64)
        self.xy = torch.zeros(self.d_in, self.d_out, **f64)
        self.yy_diag = torch.zeros(self.d_out, **f64)
        self.extra_sums = torch.zeros(3, **f64)

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
        self.extra_sums += other.extra_sums.to(self.extra_sums.device)

    def centered(self, consume: bool = False) -> CenteredStats:
        """Means and centred cross-products, all float64 on the CPU.

        consume=True centres the accumulators in place instead of copying them (two d x d
        float64 matrices less at the peak; for the streamed analysis of a large model) and
        leaves these statistics unusable."""
        n = self.n
        mx_s = self.sum_x / n  # mean of the shifted rows
        my_s = self.sum_y / n
        if consume:
            gram = self.xx.addr_(mx_s, mx_s, alpha=-n)  # Xc^T Xc
            cross = self.xy.addr_(mx_s, my_s, alpha=-n)  # Xc^T Yc
            self.xx = self.xy = None
        else:
            gram = torch.addr(self.xx, mx_s, mx_s, alpha=-n)
            cross = torch.addr(self.xy, mx_s, my_s, alpha=-n)
        y_var = float((self.yy_diag - n * my_s * my_s).sum())  # ||Yc||_F^2
        return CenteredStats(
            n=n,
            mean_x=(mx_s + self.shift_x.double()).cpu(),
            mean_y=(my_s + self.shift_y.double()).cpu(),
            gram=gram.cpu(),
            cross=cross.cpu(),
            y_sq=y_var,
        )


def paired_sums(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(||y - x||^2, ||x||^2, sum_t cos(x_t, y_t)) of row pairs, fp64 (3,), without a sync.

    Three row-norm reductions in fp32 (no fp32 copy of the rows) instead of an elementwise pass
    per quantity; the cosine comes from the norms, x.y = (|x|^2 + |y|^2 - |y - x|^2) / 2, which is
    accurate where it matters (y close to x); eps as in torch.nn.functional.cosine_similarity.
    """
    f32 = torch.promote_types(x.dtype, torch.float32)  # float64 rows stay float64
    nx = torch.linalg.vector_norm(x, dim=-1, dtype=f32)  # (n,)
    ny = torch.linalg.vector_norm(y, dim=-1, dtype=f32)
    nd = torch.linalg.vector_norm(y - x, dim=-1, dtype=f32)
    nx2, nd2 = nx.square(), nd.square()
    dot = (nx2 + ny.square() - nd2) / 2
    cos = dot / (nx.clamp_min(1e-8) * ny.clamp_min(1e-8))
    parts = (
        nd2.sum(dtype=torch.float64),
        nx2.sum(dtype=torch.float64),
        cos.sum(dtype=torch.float64),
    )
    return torch.stack(parts)


_MM_OUT_DTYPE: dict[str, bool] = {}


def _mm_out_dtype_works(device: torch.device) -> bool:
    """Whether torch.mm(a, b, out_dtype=float32) runs for half inputs here (CUDA, recent torch)."""
    key = device.type
    if key not in _MM_OUT_DTYPE:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
            _MM_OUT_DTYPE[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[key] = False
    return _MM_OUT_DTYPE[key]


def gram_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b in float32 for half-precision a (n, p), b (n, q): exact products, fp32 sums.

    CUDA with a recent torch: one half-precision GEMM with float32 output (tensor cores, no fp32
    copies). Otherwise the operands are upcast; on CUDA TF32 is then allowed, which is still exact
    because TF32 keeps 10 mantissa bits, enough for every bf16 and fp16 value.
    """
    if a.dtype in _EXACT_PRODUCT_DTYPES and a.is_cuda and _mm_out_dtype_works(a.device):
        return torch.mm(a.T, b, out_dtype=torch.float32)
    if a.is_cuda:
        matmul = torch.backends.cuda.matmul
        previous = matmul.allow_tf32
        matmul.allow_tf32 = a.dtype in _EXACT_PRODUCT_DTYPES
        try:
            return a.float().T @ b.float()
        finally:
            matmul.allow_tf32 = previous
    return a.float().T @ b.float()


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
    """How batch Grams are formed (PairStats.accumulate_dtype); combined in fp64 regardless.

    Half-precision models keep their dtype (raw rows, exact products, fp32 batch sums: on CUDA a
    tensor-core GEMM instead of an fp32 one); every other model gets shifted fp32 Grams.
    """
    return model_dtype if model_dtype in _EXACT_PRODUCT_DTYPES else torch.float32


def iterate_batches(windows: torch.Tensor, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, len(windows), batch_size):
        yield start, windows[start : start + batch_size]


def run_decoder(model, input_ids: torch.Tensor) -> None:
    """A forward of the decoder stack only (no LM head), without a KV cache."""
    device = next(model.parameters()).device
    with contextlib.suppress(StopForward):
        text_model(model)(input_ids=input_ids.to(device), use_cache=False)


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
    accumulate_dtype: torch.dtype | None = None,
) -> LayerCapture:
    """One streaming pass: PairStats of every decoder layer, plus an optional token reservoir.

    accumulate_dtype overrides accumulation_dtype(model dtype, device) (benchmarks compare them).
    Nothing in the hooks waits for the device: reservoir rows are copied off it asynchronously and
    the pass synchronises once at the end.
    """
    d = hidden_size(model)
    param = next(model.parameters())
    acc = accumulate_dtype or accumulation_dtype(param.dtype, param.device)
    stats = [PairStats(d, d, accumulate_dtype=acc) for _ in layers]
    seq_len = windows.shape[1]
    positions = (
        reservoir_positions(windows.numel(), reservoir_size, seed) if reservoir_size else None
    )
    # The reservoir is allocated once (pinned on a CUDA host, so the copies run asynchronously):
    # many small long-lived row blocks interleaved with the forward's large temporaries made the
    # allocator's heap grow with the number of tokens (+4 GB peak RSS at 64k tokens on the CPU).
    kept = None
    if positions is not None:
        pin = param.is_cuda
        kept = [torch.empty(len(positions), d, pin_memory=pin) for _ in layers]
    batch_rows: torch.Tensor | None = None
    filled = 0  # reservoir rows written by the batches before this one

    def on_layer(index, args, kwargs, output):
        x, y = layer_io(args, kwargs, output)
        stats[index].update(x, y)
        if batch_rows is not None and len(batch_rows):
            rows = x.reshape(-1, d)[batch_rows.to(x.device)].float()
            kept[index][filled : filled + len(rows)].copy_(rows, non_blocking=True)

    with hooked(dict(enumerate(layers)), on_layer):
        for start, batch in iterate_batches(windows, batch_size):
            if positions is not None:
                lo, hi = start * seq_len, (start + len(batch)) * seq_len
                in_batch = positions[(positions >= lo) & (positions < hi)]
                batch_rows = (in_batch - lo).to(param.device)
            run_decoder(model, batch)
            if batch_rows is not None:
                filled += len(batch_rows)
            if on_batch is not None:
                on_batch(len(batch))
    if param.is_cuda:
        torch.cuda.synchronize(param.device)  # the non-blocking reservoir copies have landed
    return LayerCapture(stats=stats, reservoir=kept, tokens=windows.numel())
