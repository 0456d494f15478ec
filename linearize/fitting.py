"""Least-squares / ridge affine maps from streamed statistics, solved in float64.

For rows x (d_in) and y (d_out) the affine map y ~ x A + b minimises
    ||Xc A - Yc||_F^2 + lam ||A||_F^2,   b = mean_y - mean_x A,
so A = (G + lam I)^-1 C with G = Xc^T Xc and C = Xc^T Yc (see linearize.capture).
`lam` is relative: lam = ridge * tr(G) / d_in, so one setting fits every layer's scale.
"""

from __future__ import annotations

import torch

from linearize.capture import CenteredStats, PairStats
from linearize.surgery import AffineMap

DEFAULT_RIDGE = 1e-4


def solve_ridge(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """(G + lam I)^-1 C in float64 via Cholesky, with lam relative to the mean eigenvalue."""
    gram = gram.double()
    d = gram.shape[0]
    lam = ridge * float(torch.trace(gram)) / d
    eye = torch.eye(d, dtype=torch.float64, device=gram.device)
    # A vanishing jitter keeps Cholesky alive for rank-deficient G when ridge == 0.
    jitter = max(lam, 1e-12 * float(torch.trace(gram)) / d)
    factor, info = torch.linalg.cholesky_ex(gram + jitter * eye)
    if int(info) != 0:
        return torch.linalg.lstsq(gram + jitter * eye, cross.double()).solution
    return torch.cholesky_solve(cross.double(), factor)


def fit_affine(stats: CenteredStats, ridge: float = DEFAULT_RIDGE, bias: bool = True) -> AffineMap:
    """Affine least-squares map y ~ x A + b (bias=False fits y ~ x A through the origin)."""
    if bias:
        weight = solve_ridge(stats.gram, stats.cross, ridge)
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


@torch.no_grad()
def collect_span_stats(
    model,
    spans: list[tuple[int, int]],
    windows: torch.Tensor,
    *,
    fmt: str,
    batch_size: int = 4,
    on_batch=None,
) -> dict[tuple[int, int], PairStats]:
    """Streaming statistics (features, target) for each span, in one pass over `windows`.

    linear:   features = input of layer i,                target = output of layer j.
    standard: features = M, the MLP output of layer i-1,  target = h_j - h_{i-1} + M,
              so that h_{i-1} - M + M T ~ h_j (ReplaceMe's form: the residual passes through).
    The pass stops after the last layer any span needs.
    """
    from linearize.architectures import decoder_layers, get_architecture, hidden_size
    from linearize.capture import StopForward, hooked, iterate_batches, layer_io, run_decoder

    arch = get_architecture(model)
    layers = decoder_layers(model)
    d = hidden_size(model)
    stats = {span: PairStats(d, d, extras=False) for span in spans}
    last = max(end for _, end in spans)
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def on_layer(index, args, kwargs, output):
        x, y = layer_io(args, kwargs, output)
        seen[("in", index)], seen[("out", index)] = x, y
        for span in spans:
            start, end = span
            if index != end:
                continue
            if fmt == "linear":
                stats[span].update(seen[("in", start)], y)
            else:
                m = seen[("mlp", start - 1)]
                stats[span].update(m, y - seen[("out", start - 1)] + m)
        if index == last:
            raise StopForward

    def on_mlp(index, args, kwargs, output):
        seen[("mlp", index)] = output[0] if isinstance(output, tuple) else output

    layer_hooks = {
        i: layers[i] for i in {i for s in spans for i in (s[0], s[1], s[0] - 1)} if i >= 0
    }
    mlp_hooks = {}
    if fmt == "standard":
        mlp_hooks = {s - 1: layers[s - 1].get_submodule(arch.mlp_out) for s, _ in spans if s >= 1}
    with hooked(layer_hooks, on_layer), hooked(mlp_hooks, on_mlp):
        for _, batch in iterate_batches(windows, batch_size):
            seen.clear()
            run_decoder(model, batch)
            if on_batch is not None:
                on_batch(len(batch))
    return stats


def projection_has_bias(model, span_start: int) -> bool:
    from linearize.architectures import decoder_layers, get_architecture

    arch = get_architecture(model)
    projection = decoder_layers(model)[span_start - 1].get_submodule(arch.mlp_out)
    return getattr(projection, "bias", None) is not None


def fit_spans(model, span_stats: dict, *, fmt: str, ridge: float = DEFAULT_RIDGE) -> dict:
    """AffineMap per span (linear) or OutputFold per span (standard)."""
    from linearize.surgery import OutputFold

    maps = {}
    for span, stats in span_stats.items():
        if fmt == "linear":
            maps[span] = fit_affine(stats.centered(), ridge=ridge, bias=True)
        else:
            bias = projection_has_bias(model, span[0])
            maps[span] = OutputFold(mlp=fit_affine(stats.centered(), ridge=ridge, bias=bias))
    return maps
