"""Agreement of a compressed model with its original, one chunk of logits at a time.

Both sides only ever see (n, V) chunks of logits for n token positions, in the same order, so
neither the original model nor the whole evaluation set's logits has to be resident while the
compressed model is measured. From each original chunk the `Reference` keeps, per position,

- the indices and log-probabilities of the TOP_K most likely tokens,
- the log-probability of all other tokens together (the "rest" bucket),
- the log-sum-exp of the logits (the softmax normaliser, so the top-k logits can be recovered).

`AgreementMeter` then measures on each compressed chunk, per position:

- KL(original || compressed) on the reference's top-k support with the remaining mass of each
  side lumped into one bucket: sum_{i in top-k} p_i log(p_i / q_i) + p_rest log(p_rest / q_rest).
  By the log-sum inequality this is <= the full KL, and equal to it when k = V. The rest
  masses are 1 - sum(top-k probabilities), resolved to REST_RESOLUTION (1e-6);
- top-1 agreement: the compressed argmax is the original argmax;
- top-5 containment: the original argmax is among the compressed model's 5 most likely tokens.

The report gives the mean of each over all positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOP_K = 64  # tokens per position kept from the original; 16k positions cost 8 MB
# 1 - sum(top-k probabilities) resolves masses down to about this (float32 logits): the
# original's rest bucket below it counts as empty, the compressed model's is floored at it.
REST_RESOLUTION = 1e-6
CONTAIN_K = 5

DEFINITION = (
    f"per predicted token of the evaluation windows: KL(original || compressed) on the "
    f"original's top-{TOP_K} tokens with the remaining probability mass of each model lumped "
    f"into one bucket (a lower bound of the full KL, equal to it when k = vocabulary size); "
    f"top-1 agreement = share of positions where both models' most likely token is the same; "
    f"top-{CONTAIN_K} = share of positions where the original's most likely token is among the "
    f"compressed model's {CONTAIN_K} most likely; all three are means over positions."
)


@dataclass
class AgreementResult:
    kl: float
    top1_agreement: float
    top5_contains_top1: float
    positions: int
    top_k: int


def _rest_logprob(top_logprobs: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside the top-k, per row, from the top-k alone (float64).

    1 - sum(top-k probabilities) instead of a log-sum-exp over the other V - k logits: two
    passes over (n, V) fewer. Its absolute error (~1e-7, float32 logits) is far below any KL
    worth reporting, and identical inputs still give identical results (KL exactly 0)."""
    mass = top_logprobs.double().exp().sum(1)
    return torch.log1p(-mass.clamp(max=1.0))


def _rest_term(log_p_rest: torch.Tensor, log_q_rest: torch.Tensor) -> torch.Tensor:
    """p_rest log(p_rest / q_rest) within the resolution of the rest masses."""
    floor = torch.tensor(REST_RESOLUTION, dtype=torch.float64).log()
    term = _p_log_ratio(log_p_rest, log_q_rest.double().clamp(min=floor))
    return torch.where(log_p_rest.double() < floor, torch.zeros_like(term), term)


class Reference:
    """The original model's top-k distribution per position, built chunk by chunk."""

    def __init__(self, top_k: int = TOP_K):
        self.top_k = top_k
        self._idx: list[torch.Tensor] = []
        self._logp: list[torch.Tensor] = []
        self._rest: list[torch.Tensor] = []
        self._lse: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> None:
        """Add the next (n, V) chunk of the original model's logits."""
        logits = logits.float()
        k = min(self.top_k, logits.shape[-1])
        lse = torch.logsumexp(logits, dim=1)  # (n,)
        top_logits, top_idx = logits.topk(k, dim=1)  # (n, k), sorted: column 0 is the argmax
        top_logp = top_logits - lse[:, None]  # the same op as the meter's
        self._idx.append(top_idx.cpu())
        self._logp.append(top_logp.cpu())
        self._rest.append(_rest_logprob(top_logp).cpu())
        self._lse.append(lse.cpu())

    def tensors(self) -> dict[str, torch.Tensor]:
        """indices (N, k), logprobs (N, k), rest (N,), lse (N,) over all positions so far."""
        if not self._idx:
            raise ValueError("the reference has no positions yet")
        for name in ("_idx", "_logp", "_rest", "_lse"):
            parts = getattr(self, name)
            if len(parts) > 1:
                setattr(self, name, [torch.cat(parts)])
        return {
            "indices": self._idx[0],
            "logprobs": self._logp[0],
            "rest": self._rest[0],
            "lse": self._lse[0],
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Reference:
        """A reference saved with `tensors()` (the cache keeps one per model and windows)."""
        reference = cls(top_k=tensors["indices"].shape[1])
        reference._idx, reference._logp = [tensors["indices"]], [tensors["logprobs"]]
        reference._rest, reference._lse = [tensors["rest"]], [tensors["lse"]]
        return reference

    @property
    def positions(self) -> int:
        return sum(len(t) for t in self._lse)


def _p_log_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p log(p / q) elementwise in float64, with 0 log 0 = 0 (a bucket the original leaves empty)."""
    log_p, log_q = log_p.double(), log_q.double()
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


class AgreementMeter:
    """Consumes the compressed model's logits for the reference's positions, in the same order."""

    def __init__(self, reference: Reference):
        ref = reference.tensors()
        self.idx, self.logp, self.rest = ref["indices"], ref["logprobs"], ref["rest"]
        self.offset = 0
        self.kl_sum = 0.0
        self.top1 = 0
        self.top5 = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> None:
        n = logits.shape[0]
        if self.offset + n > len(self.idx):
            raise ValueError(
                f"more positions than the reference has: {self.offset + n} > {len(self.idx)}"
            )
        span = slice(self.offset, self.offset + n)
        idx = self.idx[span].to(logits.device)
        logits = logits.float()
        lse = torch.logsumexp(logits, dim=1)  # (n,)
        top_logq = (logits.gather(1, idx) - lse[:, None]).cpu()  # (n, k) on the reference's tokens
        kl = _p_log_ratio(self.logp[span], top_logq).sum(1)  # (n,)
        kl += _rest_term(self.rest[span], _rest_logprob(top_logq))
        self.kl_sum += float(kl.sum())
        top5 = logits.topk(min(CONTAIN_K, logits.shape[1]), dim=1).indices.cpu()  # (n, 5)
        original_top1 = self.idx[span, 0]
        self.top1 += int((top5[:, 0] == original_top1).sum())
        self.top5 += int((top5 == original_top1[:, None]).any(1).sum())
        self.offset += n

    def result(self) -> AgreementResult:
        if self.offset != len(self.idx):
            raise ValueError(
                f"the compressed model was measured on {self.offset} positions, "
                f"the reference has {len(self.idx)}"
            )
        n = self.offset
        return AgreementResult(
            kl=self.kl_sum / n,
            top1_agreement=self.top1 / n,
            top5_contains_top1=self.top5 / n,
            positions=n,
            top_k=self.idx.shape[1],
        )
