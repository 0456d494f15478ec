"""Least-squares / ridge affine maps from streamed statistics, solved in float64.

For rows x (d_in) and y (d_out) the affine map y ~ x A + b minimises
    ||Xc A - Yc||_F^2 + lam ||A||_F^2,   b = mean_y - mean_x A,
so A = (G + lam I)^-1 C with G = Xc^T Xc and C = Xc^T Yc (see linearize.capture).
`lam` is relative: lam = ridge * tr(G) / d_in, so one setting fits every layer's scale.
"""

from __future__ import annotations

import torch

from linearize.architectures import hidden_size
from linearize.capture import CenteredStats, PairStats
from linearize.surgery import AffineMap, OutputFold

DEFAULT_RIDGE = 1e-4


def ridge_jitter(gram: torch.Tensor, ridge: float) -> float:
    """lam = ridge * tr(G) / d, at least a vanishing 1e-12 * tr(G) / d: that keeps Cholesky
    alive for a rank-deficient G when ridge == 0."""
    mean_eigenvalue = float(torch.trace(gram)) / gram.shape[0]
    return max(ridge, 1e-12) * mean_eigenvalue


def solve_ridge(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """(G + lam I)^-1 C in float64 via Cholesky, with lam relative to the mean eigenvalue."""
    gram = gram.double()
    d = gram.shape[0]
    eye = torch.eye(d, dtype=torch.float64, device=gram.device)
    jitter = ridge_jitter(gram, ridge)
    factor, info = torch.linalg.cholesky_ex(gram + jitter * eye)
    if int(info) != 0:
        return torch.linalg.lstsq(gram + jitter * eye, cross.double()).solution
    return torch.cholesky_solve(cross.double(), factor)


def solve_ridge_spectral(cross: torch.Tensor, spectrum, lam: float) -> torch.Tensor:
    """(G + lam I)^-1 C = V diag(1 / (e + lam)) V^T C from G's eigendecomposition (the
    analysis has it already); eigenvalues that rounding made negative count as 0."""
    scale = 1 / (spectrum.evals.clamp_min(0) + lam)
    projected = spectrum.evecs.T @ cross.double()
    return spectrum.evecs @ projected.mul_(scale[:, None])


def fit_affine(
    stats: CenteredStats, ridge: float = DEFAULT_RIDGE, bias: bool = True, spectrum=None
) -> AffineMap:
    """Affine least-squares map y ~ x A + b (bias=False fits y ~ x A through the origin).

    `spectrum` (linearize.linearity.GramSpectrum of stats.gram) solves through the
    eigendecomposition instead of a Cholesky factor: the same map to rounding."""
    if bias:
        if spectrum is None:
            weight = solve_ridge(stats.gram, stats.cross, ridge)
        else:
            weight = solve_ridge_spectral(stats.cross, spectrum, ridge_jitter(stats.gram, ridge))
        offset = stats.mean_y - stats.mean_x @ weight
        return AffineMap(weight=weight, bias=offset)
    # Uncentred normal equations: X^T X = G + n mx mx^T, X^T Y = C + n mx my^T.
    n = stats.n
    gram = stats.gram + n * torch.outer(stats.mean_x, stats.mean_x)
    cross = stats.cross + n * torch.outer(stats.mean_x, stats.mean_y)
    return AffineMap(weight=solve_ridge(gram, cross, ridge), bias=None)


def identity_map(d: int) -> AffineMap:
    return AffineMap(
        weight=torch.eye(d, dtype=torch.float64), bias=torch.zeros(d, dtype=torch.float64)
    )


# --- the fit pass: statistics for chosen spans, then their maps ---------------------------------


def fit_features(arch, fmt: str, span: tuple[int, int]) -> str:
    """What a span's map reads: the span input (linear) or block start-1's MLP output (standard)."""
    return "span_input" if fmt == "linear" else "mlp_output_of_previous_block"


class SpanFit:
    """Visitor of a pass over the fit windows of the original model (linearize.stack) that
    collects each span's fit statistics and, for healing, the teacher's hidden states.

    linear:   features = input of layer i,                target = output of layer j.
    standard: features = M, the MLP output of layer i-1,  target = h_j - h_{i-1} + M,
              so that h_{i-1} - M + M T ~ h_j (ReplaceMe's form: the residual passes through).
    The features of a span wait in an activation cache until its last layer's output arrives;
    only the spans' Grams are d x d statistics.
    Teacher: the hidden states entering layer `teacher_start` and the output of layer
    `teacher_end` (None: the model's final normed hidden states, filled by `finish`).
    """

    def __init__(self, stack, planner, spans, fmt, ids, *, teacher_start=None, teacher_end=None):
        from linearize.architectures import get_architecture

        if teacher_start is None and teacher_end is not None:
            raise ValueError("teacher_end without teacher_start: no teacher to collect")
        self.stack, self.planner, self.spans, self.fmt = stack, planner, spans, fmt
        d = hidden_size(stack.model)
        self.stats = {span: PairStats(d, d, extras=False) for span in spans}
        n, seq_len = ids.shape

        def cache():
            return planner.allocate(n, seq_len, d, stack.dtype)

        self.features = {span: cache() for span in spans}
        self.bases = {span: cache() for span in spans} if fmt == "standard" else {}
        self.teacher_start, self.teacher_end = teacher_start, teacher_end
        self.teacher_inputs = cache() if teacher_start is not None else None
        self.teacher_targets = cache() if teacher_start is not None else None
        self._mlp: torch.Tensor | None = None
        self._hooks = []
        if fmt == "standard":
            arch = get_architecture(stack.model)
            self._mlp_scale = float(arch.mlp_output_scale(stack.model.config))
            for start, _ in spans:
                before = stack.layers[start - 1]
                mlp = arch.kind_of(before).output_module(before)
                self._hooks.append(mlp.register_forward_hook(self._keep_mlp_output))

    def _keep_mlp_output(self, _module, _args, output) -> None:
        # MoE blocks may return (output, router scores); M is what reaches the residual add.
        mlp = output[0] if isinstance(output, tuple) else output
        self._mlp = mlp if self._mlp_scale == 1.0 else mlp * self._mlp_scale

    @property
    def last_layer(self) -> int:
        ends = [end for _, end in self.spans]
        if self.teacher_start is not None:
            ends.append(
                len(self.stack.layers) - 1 if self.teacher_end is None else self.teacher_end
            )
        return max(ends)

    def batch(self, index, name, rows, x, y) -> None:
        if index == self.teacher_start:
            self.teacher_inputs[rows] = x
        if index == self.teacher_end:
            self.teacher_targets[rows] = y
        for span in self.spans:
            start, end = span
            if self.fmt == "linear" and index == start:
                self.features[span][rows] = x
            if self.fmt == "standard" and index == start - 1:
                mlp = self._mlp.reshape(y.shape)  # Llama 4's MoE returns (tokens, d)
                self.features[span][rows] = mlp
                self.bases[span][rows] = y - mlp
            if index == end:
                base = self.bases[span][rows] if self.fmt == "standard" else 0
                self.stats[span].update(self.features[span][rows], y - base)

    def finish(self, streams) -> None:
        """Teacher targets after the final norm, when the pass ran to the last layer."""
        if self.teacher_start is None or self.teacher_end is not None:
            return
        from linearize.stack import batches

        stream = streams["fit"]
        for rows in batches(len(stream.ids), self.stack.batch_size):
            with torch.no_grad():
                self.teacher_targets[rows] = self.stack.finalize(stream.cache[rows])

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for cache in (*self.features.values(), *self.bases.values()):
            self.planner.release(cache)


def fit_pass(stack, planner, spans, fmt, ids, *, teacher_start=None, teacher_end=None, stage=None):
    """({span: PairStats}, teacher inputs, teacher targets): one pass over the fit windows.

    The teacher caches (None without teacher_start) belong to the caller, who releases them."""
    fit = SpanFit(
        stack, planner, spans, fmt, ids, teacher_start=teacher_start, teacher_end=teacher_end
    )
    streams = stack.open_streams(planner, {"fit": ids})
    try:
        on_batch = None if stage is None else stage.advance
        stack.run(streams, fit, last=fit.last_layer, on_batch=on_batch)
        fit.finish(streams)
    except BaseException:
        for cache in (fit.teacher_inputs, fit.teacher_targets):
            if cache is not None:
                planner.release(cache)
        raise
    finally:
        fit.close()
        planner.release(streams["fit"].cache)
    return fit.stats, fit.teacher_inputs, fit.teacher_targets


def collect_span_stats(model, spans, windows, *, fmt: str, batch_size: int = 4):
    """{span: PairStats} of a resident model (benchmarks and tests; the pipeline uses fit_pass)."""
    from linearize.activations import CachePlanner, Spill
    from linearize.stack import LayerStack

    stack = LayerStack.of(model, batch_size)
    with Spill() as spill:
        planner = CachePlanner(stack.device, 1 << 62, spill)
        stats, _, _ = fit_pass(stack, planner, spans, fmt, windows)
    return stats


def projection_has_bias(model, span_start: int) -> bool:
    """Whether the fold target of a span starting here can carry a map's intercept exactly."""
    from linearize.architectures import decoder_layers, get_architecture

    arch = get_architecture(model)
    layer = decoder_layers(model)[span_start - 1]
    carriers = arch.kind_of(layer).carriers(layer, model.config)
    return any(c.takes_intercept and c.bias is not None for c in carriers)


def fit_spans(model, span_stats: dict, *, fmt: str, ridge: float = DEFAULT_RIDGE) -> dict:
    """AffineMap per span (linear) or OutputFold per span (standard)."""

    maps = {}
    for span, stats in span_stats.items():
        if fmt == "linear":
            maps[span] = fit_affine(stats.centered(), ridge=ridge, bias=True)
        else:
            bias = projection_has_bias(model, span[0])
            maps[span] = OutputFold(mlp=fit_affine(stats.centered(), ridge=ridge, bias=bias))
    return maps


def shrink_toward_identity(maps: dict, amount: float) -> dict:
    """Each map moved toward the identity: A -> (1 - s) A + s I, b -> (1 - s) b.

    The least-squares map learns the calibration text's domain; the identity is plain removal
    of the span (the fold's identity passes the block's MLP output through unchanged), which
    learns nothing. Between the two, `amount` trades in-domain fit for generality."""
    from dataclasses import replace

    def shrink(affine: AffineMap | None) -> AffineMap | None:
        if affine is None:
            return None
        weight = affine.weight
        eye = torch.eye(weight.shape[0], weight.shape[1], dtype=weight.dtype, device=weight.device)
        bias = None if affine.bias is None else (1 - amount) * affine.bias
        return AffineMap((1 - amount) * weight + amount * eye, bias)

    return {
        span: replace(m, mlp=shrink(m.mlp), attn=shrink(m.attn))
        if isinstance(m, OutputFold)
        else shrink(m)
        for span, m in maps.items()
    }
