"""Per-layer scores: the paper's linearity score (with and without residual), anisotropy,
intrinsic dimension (TwoNN), update norm, cosine, and feature triggering.

Formulas follow METHODS.md. With G = Xc^T Xc, C = Xc^T Yc:
    score = 1 - min_A ||X~ A - Y~||_F^2 = tr(C^T G^+ C) / ||Yc||_F^2
(the R^2 of the multi-output regression). The without-residual variant replaces Y by Y - X:
    Xc^T (Yc - Xc) = C - G,   ||Yc - Xc||^2 = ||Yc||^2 - 2 tr(C) + tr(G).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from linearize.capture import CenteredStats, PairStats

# Eigenvalues below this fraction of the largest are treated as zero in G^+.
PINV_RCOND = 1e-10


@dataclass(frozen=True)
class GramSpectrum:
    """G = V diag(e) V^T, computed once per layer: both scores, the anisotropy and the
    analysis map need it, and a float64 eigendecomposition is the analysis's costliest step
    (minutes per layer at d = 8192 on a CPU)."""

    evals: torch.Tensor  # (d,) ascending
    evecs: torch.Tensor  # (d, d), columns are eigenvectors

    @classmethod
    def of(cls, gram: torch.Tensor) -> GramSpectrum:
        evals, evecs = torch.linalg.eigh(gram.double())
        return cls(evals, evecs)

    def inverse_on_range(self) -> torch.Tensor:
        """1 / e for the eigenvalues kept by PINV_RCOND, 0 for the rest (the G^+ diagonal)."""
        keep = self.evals > PINV_RCOND * self.evals.max().clamp_min(1e-300)
        return torch.where(keep, 1 / self.evals, torch.zeros_like(self.evals))


def explained_fraction(
    gram: torch.Tensor, cross: torch.Tensor, y_sq: float, spectrum: GramSpectrum | None = None
) -> float:
    """tr(C^T G^+ C) / ||Yc||^2, with a relative eigenvalue cutoff for rank deficiency.

    A constant target (||Yc|| = 0, e.g. the update of an identity layer) is trivially linear: 1.
    """
    if _constant_target(gram, y_sq):
        return 1.0
    spectrum = GramSpectrum.of(gram) if spectrum is None else spectrum
    projected = spectrum.evecs.T @ cross.double()  # (d, d_out): C in G's eigenbasis
    return _explained(projected, spectrum, y_sq)


def _constant_target(gram: torch.Tensor, y_sq: float) -> bool:
    return y_sq <= 1e-12 * max(float(torch.trace(gram)), 1e-300)


def _explained(projected: torch.Tensor, spectrum: GramSpectrum, y_sq: float) -> float:
    """tr(P^T diag(1/e) P) / y_sq for P = V^T C; squares P in place (the caller's copy)."""
    explained = float(projected.square_().sum(1) @ spectrum.inverse_on_range())
    return explained / y_sq


def linearity_score(stats: CenteredStats, spectrum: GramSpectrum | None = None) -> float:
    """The paper's score between a layer's input and output (residual included)."""
    return explained_fraction(stats.gram, stats.cross, stats.y_sq, spectrum)


def update_target_sq(stats: CenteredStats) -> float:
    """||Yc - Xc||^2 = ||Yc||^2 - 2 tr(C) + tr(G)."""
    return stats.y_sq - 2 * float(torch.trace(stats.cross)) + float(torch.trace(stats.gram))


def linearity_score_without_residual(
    stats: CenteredStats, spectrum: GramSpectrum | None = None
) -> float:
    """The same score for the block's update Y - X (cross-products C - G)."""
    return explained_fraction(
        stats.gram, stats.cross - stats.gram, update_target_sq(stats), spectrum
    )


def anisotropy(gram: torch.Tensor, spectrum: GramSpectrum | None = None) -> float:
    """Largest covariance eigenvalue over the sum of eigenvalues (1/d isotropic .. 1 one direction)."""
    evals = torch.linalg.eigvalsh(gram.double()) if spectrum is None else spectrum.evals
    return float(evals[-1] / evals.clamp_min(0).sum())


def intrinsic_dimension_twonn(points: torch.Tensor, discard_fraction: float = 0.1) -> float:
    """TwoNN estimator (Facco et al. 2017) on a bounded sample of points (n, d).

    mu = r2 / r1 per point; with F the empirical CDF of mu, -log(1 - F(mu)) = d_id * log(mu).
    The largest `discard_fraction` of mu values are dropped (their CDF tail is noisy), and the
    line is fitted through the origin by least squares on the rest.
    """
    # Identical points (e.g. the same token at layer 0) have no defined neighbour ratio.
    x = torch.unique(points.double(), dim=0)
    r = _two_nearest_distances(x)  # (n, 2): r1, r2
    valid = r[:, 0] > 0  # duplicates give r1 = 0
    mu = (r[valid, 1] / r[valid, 0]).sort().values
    n = mu.numel()
    keep = int(math.floor(n * (1 - discard_fraction)))
    cdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    log_mu = mu.log()[:keep]
    target = -torch.log1p(-cdf[:keep])
    return float((log_mu @ target) / (log_mu @ log_mu))


def _two_nearest_distances(x: torch.Tensor, block: int = 256) -> torch.Tensor:
    """(n, 2) distances of each row to its nearest and second-nearest other row, a block of
    rows at a time: the (n, n) distance matrix of a 2048-point reservoir is 32 MB in float64."""
    nearest = []
    for start in range(0, len(x), block):
        dist = torch.cdist(x[start : start + block], x)  # (block, n)
        rows = torch.arange(dist.shape[0])
        dist[rows, rows + start] = float("inf")  # a point is not its own neighbour
        nearest.append(dist.topk(2, dim=1, largest=False).values)
    return torch.cat(nearest)


def summarize_pair(
    stats: PairStats, centered: CenteredStats | None = None, spectrum: GramSpectrum | None = None
) -> dict:
    """The score fields of one layer from its streamed statistics (`centered`, `spectrum`: its
    centred form and the eigendecomposition of its Gram, when the caller has them already)."""
    centered = stats.centered() if centered is None else centered
    spectrum = GramSpectrum.of(centered.gram) if spectrum is None else spectrum
    return {
        **both_scores(centered, spectrum),
        "anisotropy": anisotropy(centered.gram, spectrum),
        "relative_update_norm": math.sqrt(stats.sq_update / max(stats.sq_input, 1e-300)),
        "cosine_in_out": stats.cos_sum / max(stats.n, 1),
    }


def both_scores(centered: CenteredStats, spectrum: GramSpectrum) -> dict[str, float]:
    """Both scores from one projection: V^T (C - G) = V^T C - diag(e) V^T, so the update's
    cross-products C - G (another d x d) are never formed."""
    projected = spectrum.evecs.T @ centered.cross.double()
    update = spectrum.evecs.T * spectrum.evals[:, None]
    update.neg_().add_(projected)
    update_sq = update_target_sq(centered)
    return {
        "score": 1.0
        if _constant_target(centered.gram, centered.y_sq)
        else _explained(projected, spectrum, centered.y_sq),
        "score_without_residual": 1.0
        if _constant_target(centered.gram, update_sq)
        else _explained(update, spectrum, update_sq),
    }


# --- per-token nonlinearity on the validation slice ("feature triggering") -------------------


def top_share(residual: torch.Tensor, fraction: float = 0.01) -> float:
    """Share of the total residual carried by the top `fraction` of tokens."""
    k = max(1, int(round(fraction * residual.numel())))
    return float(residual.topk(k).values.sum() / residual.sum().clamp_min(1e-300))


def trigger_tokens(
    residual: torch.Tensor, windows: torch.Tensor, tokenizer, top: int = 5, context: int = 8
) -> list[dict]:
    """The tokens carrying the largest residual, decoded with window, position and context."""
    seq_len = windows.shape[1]
    total = float(residual.sum().clamp_min(1e-300))
    flat = windows.reshape(-1)
    out = []
    for pos in residual.topk(min(top, residual.numel())).indices.tolist():
        window, position = divmod(pos, seq_len)
        start = window * seq_len + max(0, position - context)
        out.append(
            {
                "window": window,
                "position": position,
                "token": tokenizer.decode([int(flat[pos])]),
                "context": tokenizer.decode(flat[start : pos + 1].tolist()),
                "residual_share": float(residual[pos]) / total,
            }
        )
    return out
