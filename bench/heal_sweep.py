"""Which healing recipe buys the most perplexity in a fixed time budget?

Same model, windows and fitted maps for every variant (the default selection and fit of
`linearize compress --layers K`); each variant restarts from the fitted maps, heals for
--seconds, and is measured on the validation slice and on the evaluation windows. Variants:

  maps/LR          only the maps' carriers train (the folded down_proj), Adam at LR
  maps+N/LR        ... plus every weight matrix of the N decoder layers from the cut
  suffix/LR        ... plus every weight matrix of all layers after the cut
  +kl              KL(teacher || student) on the full logits instead of the centred-logit MSE
  +decay           the learning rate falls linearly to zero over the budget
  +decayNN         ... over its last NN percent only (constant before)
  +norms           the RMSNorm gains of the same layers train too
  +midX            plus X times a hidden-state loss right after the healed layers: the relative
                   squared error of the RMS-normalised residual stream against the teacher's at
                   the same depth (the teacher's layer N + k for the student's layer N)

    python bench/heal_sweep.py --data ../shared/data/wikitext-2-raw/wiki.test.raw

Prints a table and writes bench/results/heal_sweep.json. Budgets are wall-clock, so run it on
an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import machine  # noqa: E402  (bench/machine.py, beside this script)
from engine import BenchJob  # noqa: E402

from api_schemas import CompressSpec, DataSpec  # noqa: E402
from linearize import healing  # noqa: E402
from linearize.architectures import decoder_layers  # noqa: E402
from linearize.evaluation import evaluate_perplexity  # noqa: E402

VARIANTS = (
    "maps/3e-4",  # the previous default
    "maps/3e-3",
    "maps+2/1e-3",
    "maps+4/1e-3",  # the first choice; the default is maps+4/3e-4 (see BENCHMARKS.md)
    "suffix/1e-4",
    "maps+4/3e-4+kl",
)


def parse_variant(name: str, n_layers: int) -> dict:
    """'maps+4/1e-3+kl+decay30' -> 4 neighbour layers, lr 1e-3, KL, decay over the last 30%."""
    params, rest = name.split("/")
    lr, *flags = rest.split("+")
    neighbours = {"maps": 0, "suffix": n_layers}.get(params)
    if neighbours is None:
        neighbours = int(params.removeprefix("maps+"))
    decay, mid = 0.0, 0.0
    for flag in flags:
        percent = flag.removeprefix("decay")
        if flag.startswith("decay") and (
            percent == "" or percent.isdigit() and 0 < int(percent) <= 100
        ):
            decay = int(percent or 100) / 100
        elif flag.startswith("mid"):
            mid = float(flag.removeprefix("mid"))
        elif flag not in ("kl", "norms"):
            raise SystemExit(f"unknown variant flag {flag!r} in {name!r}")
    return {
        "neighbours": neighbours,
        "lr": float(lr),
        "kl": "kl" in flags,
        "norms": "norms" in flags,
        "decay": decay,
        "mid": mid,
    }


def with_norms(model, params: list, start: int, neighbours: int) -> list:
    """`params` plus the 1-D parameters (norm gains) of layers [start, start + neighbours)."""
    extra = [
        p for layer in decoder_layers(model)[start : start + neighbours] for p in layer.parameters()
    ]
    return params + [p for p in extra if p.ndim == 1]


def rms_normalised(h: torch.Tensor) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


class MidLoss:
    """Final-state loss + weight x the relative error of the student's normalised residual
    stream entering `position` against the teacher's. The teacher's mid states ride along in the
    cache's `finals` (concatenated on the feature axis), because heal() hands the loss function
    only (student final, teacher final) for the windows it picked."""

    def __init__(self, model, position: int, weight: float, final_loss):
        self.layer = decoder_layers(model)[position]
        self.weight, self.final_loss = weight, final_loss
        self.captured = None
        self.last_mid = math.nan

    def __call__(self, h_student, h_teacher_and_mid):
        d = h_student.shape[-1]
        final_t, mid_t = h_teacher_and_mid[..., :d], h_teacher_and_mid[..., d:]
        diff = rms_normalised(self.captured.float()) - rms_normalised(mid_t)
        mid = (diff.pow(2).sum(-1) / d).mean()
        self.last_mid = mid.item()
        return self.final_loss(h_student, final_t) + self.weight * mid

    def capture(self, _module, args, kwargs):
        self.captured = args[0] if args else kwargs["hidden_states"]


def kl_loss(model):
    head = model.get_output_embeddings()

    def loss(h_student, h_teacher):
        with torch.no_grad():
            teacher = F.log_softmax(head(h_teacher).float(), -1)
        student = F.log_softmax(head(h_student).float(), -1)
        return F.kl_div(
            student.flatten(0, -2), teacher.flatten(0, -2), log_target=True, reduction="batchmean"
        )

    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "heal_sweep.json"))
    args = parser.parse_args()

    spec = CompressSpec(
        model=args.model,
        data=DataSpec(path=args.data),
        layers=args.layers,
        calib_tokens=args.calib_tokens,
        eval_tokens=args.eval_tokens,
    )
    job = BenchJob(spec)
    loaded = job.load(spec.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    windows = job.windows(tokenizer, eval_tokens=spec.eval_tokens)
    baseline, baseline_val, analysis = job.baseline_and_analysis(model, windows, tokenizer)
    n_layers = len(decoder_layers(model))
    indices, _ = job.select(model, windows, analysis, baseline_val, n_layers)
    teacher = job.capture_teacher(model, windows, indices)
    mids = [parse_variant(v, n_layers)["mid"] for v in args.variants.split(",")]
    if any(mids):  # the teacher's residual stream after the healed layers (see MidLoss)
        mid_position = teacher.start + healing.NEIGHBOUR_LAYERS
        deeper = healing.capture_teacher(model, windows.fit, mid_position + len(indices))
        mid_teacher = healing.TeacherCache(
            teacher.start,
            teacher.inputs,
            torch.cat([teacher.targets, deeper.inputs.data], -1),
            "final",
        )
    carriers = job.replace(model, windows, indices)
    fitted = copy.deepcopy(model.state_dict())
    rows = [measure("fitted (no healing)", model, windows, baseline, baseline_val, None)]
    for name in args.variants.split(","):
        model.load_state_dict(fitted)
        variant = parse_variant(name, n_layers)
        params = healing.healing_params(model, carriers, variant["neighbours"])
        if variant["norms"]:
            params = with_norms(model, params, teacher.start, variant["neighbours"])
        loss_fn = kl_loss(model) if variant["kl"] else None
        cache, hook = teacher, contextlib.nullcontext()
        if variant["mid"]:
            metric = healing.logit_metric(model.get_output_embeddings().weight)
            final = loss_fn or functools.partial(healing.centred_logit_mse, metric=metric)
            loss_fn = MidLoss(model, mid_position, variant["mid"], final)
            cache = mid_teacher
            hook = pre_hook(loss_fn.layer, loss_fn.capture)
        with hook:
            result = healing.heal(
                model,
                cache,
                windows.fit,
                params,
                max_steps=10**9,
                max_seconds=args.seconds,
                lr=variant["lr"],
                loss_fn=loss_fn,
                decay=variant["decay"],
            )
        if variant["mid"]:
            print(f"  last mid loss {loss_fn.last_mid:.4f} (weight {variant['mid']})")
        row = measure(name, model, windows, baseline, baseline_val, result)
        row["trained_params"] = sum(p.numel() for p in params)
        rows.append(row)
        print_row(row)

    report = {
        "model": args.model,
        "layers": indices,
        "calib_tokens": args.calib_tokens,
        "eval_tokens": args.eval_tokens,
        "seconds": args.seconds,
        "threads": torch.get_num_threads(),
        "machine": machine.describe(),
        "date": time.strftime("%Y-%m-%d"),
        "baseline": baseline,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nlayers {indices}, {args.seconds:.0f} s per variant, baseline {baseline:.3f}")
    for row in rows:
        print_row(row)


@contextlib.contextmanager
def pre_hook(module, fn):
    handle = module.register_forward_pre_hook(fn, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def measure(name, model, windows, baseline, baseline_val, result) -> dict:
    val = evaluate_perplexity(model, windows.validation)
    ppl = evaluate_perplexity(model, windows.eval)
    return {
        "variant": name,
        "steps": result.steps if result else 0,
        "validation_increase_pct": 100 * (val / baseline_val - 1),
        "eval_increase_pct": 100 * (ppl / baseline - 1),
        "train_loss_last": result.train_loss_last if result else None,
    }


def print_row(row: dict) -> None:
    print(
        f"{row['variant']:<22} steps {row['steps']:>4}  "
        f"validation {row['validation_increase_pct']:+6.1f}%  eval {row['eval_increase_pct']:+6.1f}%",
        flush=True,
    )


if __name__ == "__main__":
    main()
