"""Job specifications: validated once at each entry point (CLI flags, REST body, Celery payload).

The CLI and the service build the same models, so defaults live here and nowhere else.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api_schemas.sizes import SIZE_PATTERN

BUNDLED_MODEL_ALIAS = "smollm2-135m"
MAX_LAYER_FRACTION_NOTE = "at most L - 2 layers can be replaced (the first and last stay)"

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
Streaming = Literal["auto", "on", "off"]
BUDGET_PATTERN = r"^(auto|" + SIZE_PATTERN[1:-1] + r")$"
OutputFormat = Literal["standard", "linear"]
# What stands in for the dropped layers before healing: "fit" a least-squares map (folded, or a
# linear block), "remove" nothing (the layer before each cut heals); "auto" is "fit", the better
# of the two in domain at the default budget (BENCHMARKS.md, issue 16), unless the general text
# mixture is built: then the one that measures better on it (linearize.auto).
SpanMethod = Literal["auto", "fit", "remove"]
ALL_TASKS = "*"  # gate_task_retained key: the rule applies to every task
GENERAL_TEXT = "general"  # the mixture's held-out part, measured when no eval_data is given
TEXT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SEARCH_BUDGET_PATTERN = (
    r"^([1-9][0-9]*|[0-9]+(\.[0-9]+)?[smh])$"  # trials, or seconds/minutes/hours
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataSpec(_Frozen):
    """Where the text comes from: exactly one of a local path, an uploaded dataset, a builtin."""

    path: str | None = Field(None, description="Text file (.txt/.raw) or JSONL with a text field.")
    dataset_id: str | None = Field(None, description="A dataset uploaded to the service.")
    builtin: Literal["wikitext2"] | None = Field(
        None, description="A text the installation ships or points at (wikitext-2 raw test split)."
    )
    text_field: str = Field("text", description="The field read from each JSONL record.")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> DataSpec:
        given = [n for n in ("path", "dataset_id", "builtin") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"data needs exactly one of path, dataset_id, builtin; got {given or 'none'}"
            )
        return self


class _JobBase(_Frozen):
    model: str = Field(
        BUNDLED_MODEL_ALIAS,
        description="Hub id, local directory (safetensors), .gguf file, or the alias smollm2-135m.",
    )
    data: DataSpec
    calib_tokens: int = Field(
        16384, ge=1, description="Calibration tokens (first half of the text)."
    )
    seq_len: int = Field(512, ge=8, le=32768, description="Tokens per window.")
    validation_fraction: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="Share of calibration windows held out for ranking, selection and tuning.",
    )
    dtype: Dtype = "auto"
    device: Device = "auto"
    seed: int = 0
    memory_budget: str = Field(
        "auto",
        pattern=BUDGET_PATTERN,
        description="What the job may keep on the device (24GB, 12GiB...); auto: what the "
        "device has free, minus a margin.",
    )
    streaming: Streaming = Field(
        "auto",
        description="on: run one decoder layer at a time from the shards; off: load the whole "
        "model; auto: stream when the model does not fit the memory budget.",
    )
    host_budget: str | None = Field(
        None,
        pattern=SIZE_PATTERN,
        description="Host memory the activation caches may take before they spill to disk "
        "under the cache dir (0 spills every cache); default: no limit.",
    )
    metadata: dict[str, str] = Field(default_factory=dict, description="Free-form labels.")
    webhook_url: str | None = Field(None, description="Service only: POSTed on terminal states.")


class AnalyzeSpec(_JobBase):
    """Per-layer linearity analysis, no surgery."""

    kind: Literal["analyze"] = "analyze"


class CompressSpec(_JobBase):
    """Replace layers by fitted linear maps (or remove them and fold), evaluate, save."""

    kind: Literal["compress"] = "compress"
    layers: int | Literal["max"] | None = Field(
        None,
        description="Number of layers to replace: the best-scoring window of adjacent layers; "
        "max: the largest number whose healed model passes every gate (a search, linearize.search).",
    )
    indices: list[int] | None = Field(None, description="Explicit original layer indices.")
    target_ppl_increase: float | None = Field(
        None, gt=0, description="Replace as many layers as keep the validation increase <= P %."
    )
    gate_ppl_increase: float | None = Field(
        None, ge=0, description="Quality gate: fail (exit 1) if the eval increase exceeds P %."
    )
    search_budget: str | None = Field(
        None,
        pattern=SEARCH_BUDGET_PATTERN,
        description="layers=max only: the search's bound, a trial count (8) or a time (90s, "
        "20m, 1h); default: no bound.",
    )
    dry_run: bool = Field(
        False,
        description="layers=max only: the analysis and the curve predicted from unhealed probes; "
        "no healing, no checkpoint.",
    )
    eval_tokens: int = Field(16384, ge=1, description="Evaluation tokens (second half).")
    format: OutputFormat = Field("standard", description="standard: folded, plain HF checkpoint.")
    method: SpanMethod = Field(
        "auto",
        description="fit: replace the best-fitting window of layers by its least-squares map "
        "(folded into the layer before it, or a linear block); remove: drop the layers that "
        "change their input least (highest cos(input, output)), no map, and heal from the layer "
        "before each cut (better on text unlike the calibration text); auto: the one of the "
        "two that measures better, unhealed, on the general text mixture's held-out part "
        "(fit when the mixture is not built, the job streams or the budget is a target).",
    )
    heal_steps: int | None = Field(
        None, ge=0, description="Healing (distillation) steps cap; 0 disables healing."
    )
    heal_tokens: int | None = Field(
        None,
        ge=1,
        description="Healing text in tokens: the first N of the calibration half without its "
        "validation windows (the fit windows, then the text after the calibration windows). "
        "None: all of it, at most what the step cap can draw and what fits the memory budget.",
    )
    use_cache: bool = Field(
        True, description="Reuse baseline perplexity and analysis of the same model and data."
    )
    heal_seconds: float | None = Field(
        None, gt=0, description="Healing time budget in seconds (None: the default budget)."
    )
    gate_kl: float | None = Field(
        None, ge=0, description="Quality gate: fail if the mean KL(original || compressed) > X."
    )
    gate_agreement: float | None = Field(
        None, ge=0, le=100, description="Quality gate: fail if the top-1 agreement is below P %."
    )
    gate_task_retained: dict[str, float] = Field(
        default_factory=dict,
        description="Quality gate per lm-eval task: fail if the compressed model keeps less "
        f"than P % of the original's accuracy; the key {ALL_TASKS!r} means every task.",
    )
    tasks: list[str] = Field(
        default_factory=list, description="lm-evaluation-harness tasks run on both models."
    )
    task_dir: str | None = Field(None, description="A directory of local lm-eval task YAMLs.")
    generation_prompts: int = Field(
        16, ge=0, le=256, description="Prompts of the generation check; 0 turns it off."
    )
    heal_mix: float | None = Field(
        None,
        description="Share of the healing windows drawn from the general text mixture (replay) "
        "instead of the calibration text, in [0, 1]; 0 turns replay off; None: the default "
        "share when the mixture is built (linearize.mixture).",
    )
    fit_mix: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of the fit windows (the analysis's and the fitted map's statistics) "
        "drawn from the general text mixture instead of the calibration text, in [0, 1]; the "
        "validation windows stay the calibration text's. 0: the calibration text alone.",
    )
    map_shrink: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = Field(
        0.0,
        description="Shrink each fitted map toward the identity: A -> (1 - s) A + s I, "
        "b -> (1 - s) b. 0 keeps the least-squares map; 1 is the identity, i.e. plain removal "
        "of the span with the fit's choice of layers; auto: the amount of SHRINK_GRID whose "
        "unhealed model measures the lowest perplexity on held-out general text.",
    )
    heal_text: str | None = Field(
        None,
        pattern=r"^(calibration|generated(:[1-9][0-9]*)?)$",
        description="calibration: heal on the calibration text; generated[:N]: on N tokens "
        "sampled from the original model (default N: the healing text's size) after the fit "
        "windows; None: generated on a GPU, calibration elsewhere.",
    )
    heal_loss: Literal["mse", "kl"] = Field(
        "mse",
        description="Distillation loss: mse, the centred-logit MSE; kl, KL(teacher || student) "
        "on the teacher's top-256 logits.",
    )
    eval_data: dict[str, str] = Field(
        default_factory=dict,
        description="More texts measured before and after, NAME -> text file; without any, "
        f"the general mixture's held-out part is measured as {GENERAL_TEXT!r}.",
    )
    gate_text_ppl_increase: dict[str, float] = Field(
        default_factory=dict,
        description="Quality gate per text: fail if the named text's perplexity increase "
        "exceeds P %.",
    )

    @model_validator(mode="after")
    def _texts_are_named_and_shares_are_shares(self) -> CompressSpec:
        if self.heal_mix is not None and not 0 <= self.heal_mix <= 1:
            raise ValueError(
                "heal_mix is the share of healing windows drawn from the general mixture, "
                f"in [0, 1]; got {self.heal_mix}"
            )
        if self.map_shrink not in (0, "auto") and self.method == "remove":
            raise ValueError("map_shrink shrinks a fitted map, and method=remove fits none")
        if self.heal_mix and self.heal_steps == 0:
            raise ValueError("heal_mix mixes the healing text, but heal_steps=0 turns healing off")
        for name, path in self.eval_data.items():
            if not TEXT_NAME.fullmatch(name):
                raise ValueError(
                    f"eval_data name {name!r}: use letters, digits, '_', '-' or '.' (e.g. code)"
                )
            if not path.strip():
                raise ValueError(f"eval_data {name}: no file given")
        known = list(self.eval_data) or [GENERAL_TEXT]
        for name, limit in self.gate_text_ppl_increase.items():
            if name not in known:
                raise ValueError(
                    f"gate_ppl_increase names the text {name!r}, which is not measured "
                    f"(texts: {', '.join(known)})"
                )
            if limit < 0:
                raise ValueError(f"gate_ppl_increase {name}: {limit} is not a percentage >= 0")
        return self

    @model_validator(mode="after")
    def _task_gates_name_tasks(self) -> CompressSpec:
        if len(set(self.tasks)) != len(self.tasks) or any(not t.strip() for t in self.tasks):
            raise ValueError(f"tasks must be distinct, non-empty names; got {self.tasks}")
        if self.task_dir is not None and not self.tasks:
            raise ValueError("task_dir needs tasks naming the tasks to run")
        for task, limit in self.gate_task_retained.items():
            if task != ALL_TASKS and task not in self.tasks:
                raise ValueError(
                    f"gate_task_retained names task {task!r}, which is not among the tasks that "
                    f"run ({self.tasks or 'none'})"
                )
            if task == ALL_TASKS and not self.tasks:
                raise ValueError("gate_task_retained needs tasks to run")
            if not 0 <= limit <= 1000:
                raise ValueError(f"gate_task_retained {task}: {limit} is not a percentage")
        return self

    @model_validator(mode="after")
    def _removal_writes_a_standard_checkpoint(self) -> CompressSpec:
        if self.method == "remove" and self.format == "linear":
            raise ValueError(
                "method=remove drops the span and leaves no linear block to write: use "
                "format=standard with it (or method=fit for a linear block)"
            )
        return self

    @model_validator(mode="after")
    def _heal_tokens_fill_a_window(self) -> CompressSpec:
        if self.heal_tokens is None:
            return self
        if self.heal_steps == 0:
            raise ValueError("heal_tokens is the healing text, but heal_steps=0 turns healing off")
        if self.heal_tokens < self.seq_len:
            raise ValueError(
                f"heal_tokens={self.heal_tokens} is less than one window of seq_len={self.seq_len}"
            )
        return self

    @model_validator(mode="after")
    def _exactly_one_budget(self) -> CompressSpec:
        given = [n for n in ("layers", "indices", "target_ppl_increase") if getattr(self, n)]
        if isinstance(self.layers, int) and self.layers <= 0:
            raise ValueError(f"layers must be >= 1 ({MAX_LAYER_FRACTION_NOTE}); got {self.layers}")
        if self.indices is not None:
            if not self.indices:
                raise ValueError("indices must name at least one layer")
            if len(set(self.indices)) != len(self.indices) or min(self.indices) < 0:
                raise ValueError(f"indices must be distinct and >= 0; got {self.indices}")
        if len(given) != 1:
            raise ValueError(
                "give exactly one budget: layers, indices or target_ppl_increase; "
                f"got {given or 'none'}"
            )
        return self

    @model_validator(mode="after")
    def _max_layers_need_a_gate(self) -> CompressSpec:
        searched = self.layers == "max"
        if searched and not self.searched_gates():
            raise ValueError(
                "layers=max searches the largest k that passes the gates: give at least one of "
                "gate_ppl_increase, gate_kl, gate_agreement"
            )
        for name in ("search_budget", "dry_run"):
            if getattr(self, name) and not searched:
                raise ValueError(f"{name} belongs to the search of layers=max; give layers=max")
        return self

    def searched_gates(self) -> list[str]:
        """The gates the search of layers=max measures on every trial (task gates are judged
        on the checkpoint only: lm-eval per trial would cost more than the healing)."""
        names = ("gate_ppl_increase", "gate_kl", "gate_agreement")
        return [n for n in names if getattr(self, n) is not None]


class EvalSpec(_JobBase):
    """Perplexity of one model or saved checkpoint on the evaluation windows."""

    kind: Literal["eval"] = "eval"
    eval_tokens: int = Field(16384, ge=1)
    reference: str | None = Field(
        None,
        description="An original model to measure agreement with (KL, top-1, top-5) on the same "
        "evaluation windows; it runs first and is released before `model` loads.",
    )


class CompareSpec(_JobBase):
    """The same analysis on several models over the same windows."""

    kind: Literal["compare"] = "compare"
    models: list[str] = Field(..., min_length=2)
    model: str = Field("", description="Unused for compare; see `models`.")


JobSpec = Annotated[
    AnalyzeSpec | CompressSpec | EvalSpec | CompareSpec, Field(discriminator="kind")
]
