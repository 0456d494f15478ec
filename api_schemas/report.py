"""The versioned report.json schema. Bump REPORT_SCHEMA_VERSION on any breaking change."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

REPORT_SCHEMA_VERSION = "1.0"

PERPLEXITY_DEFINITION = (
    "exp(mean token negative log-likelihood over all predicted tokens of the evaluation windows); "
    "windows: the source read as UTF-8 with newlines normalised to LF, its second half by "
    "characters (the evaluation text) tokenized with the model tokenizer's default special tokens, the "
    "first eval_tokens tokens cut into non-overlapping seq_len windows, labels = inputs (each "
    "window predicts its tokens 2..seq_len)."
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceQuantization(_Model):
    """A source stored quantized, and the dequantized checkpoint written from it."""

    method: str = Field(..., description="quant_method of the source's quantization_config.")
    scheme: str = Field(..., description="How it is quantized: 'fp8 block 128x128', 'mxfp4'.")
    dtype: str = Field(..., description="What the quantized tensors are stored as.")
    bytes: int = Field(..., description="Bytes of the source's weight files on disk.")
    output_dtype: str | None = Field(None, description="dtype the checkpoint is written in.")
    output_bytes: int | None = Field(None, description="Bytes of the written weight files.")


class ModelInfo(_Model):
    source: str
    architecture: str
    dtype: str
    hidden_size: int
    layers_before: int
    layers_after: int | None = None
    params_before: int
    params_after: int | None = None
    bytes_before: int = Field(..., description="Parameter bytes in the loaded dtype.")
    bytes_after: int | None = Field(None, description="Parameter bytes after, same dtype.")
    checkpoint_bytes: int | None = Field(None, description="Bytes on disk of the checkpoint.")
    extra_params: int = Field(0, description="Parameters added by maps or biases.")
    config_changes: list[str] | None = Field(
        None,
        description="config.json fields (dotted paths) the surgery changed; every other "
        "non-weight file of the source is copied byte for byte.",
    )
    source_quantization: SourceQuantization | None = Field(
        None, description="Set when the source is stored quantized: it is read dequantized."
    )


class TriggerToken(_Model):
    position: int
    window: int
    token: str
    context: str
    residual_share: float


class LayerLinearity(_Model):
    index: int
    score: float = Field(..., description="Paper score: R^2 of Y on X after centring + norm.")
    score_without_residual: float = Field(..., description="Same with Y replaced by Y - X.")
    anisotropy: float = Field(..., description="Top covariance eigenvalue / trace, layer input.")
    intrinsic_dimension: float | None = Field(None, description="TwoNN on a reservoir.")
    relative_update_norm: float = Field(..., description="||Y - X||_F / ||X||_F.")
    cosine_in_out: float = Field(..., description="Mean token cos(x, y).")
    validation_error: float | None = Field(
        None, description="||Y - f(X)||^2 / ||Y - mean||^2 of the fitted map on held-out tokens."
    )
    top1pct_residual_share: float | None = None
    trigger_tokens: list[TriggerToken] = Field(default_factory=list)


class Perplexity(_Model):
    baseline: float
    compressed: float | None = Field(
        None,
        description="Evaluation windows, the compressed checkpoint reloaded from disk (the model "
        "that is published, measured once).",
    )
    reloaded: float | None = Field(None, description="The same figure as `compressed`.")
    before_healing: float | None = None
    increase_pct: float | None = None
    validation_baseline: float | None = None
    validation_compressed: float | None = Field(
        None, description="Validation slice, the compressed model in memory."
    )
    validation_reloaded: float | None = Field(
        None,
        description="Validation slice, the reloaded checkpoint: must match validation_compressed "
        "within 0.5% (the reload check).",
    )
    definition: str = PERPLEXITY_DEFINITION


class TextPerplexity(_Model):
    """One more text measured before and after (--eval-data, or the mixture's held-out part)."""

    name: str
    source: str
    tokens: int
    baseline: float
    compressed: float | None = None
    increase_pct: float | None = None
    ratio_to_eval: float | None = Field(
        None, description="increase_pct / the evaluation windows' increase_pct (when > 0)."
    )


class Throughput(_Model):
    """Forward tokens/s of the original and the compressed model: the medians of interleaved,
    warmed-up repetitions (linearize.throughput), next to what the arithmetic allows."""

    tokens_per_s_before: float = Field(..., description="Median over the repetitions.")
    tokens_per_s_after: float | None = Field(None, description="Median over the repetitions.")
    device: str
    repeats: int | None = Field(None, description="Timed repetitions of each model.")
    runs_before: list[float] = Field(default_factory=list, description="tokens/s, each run.")
    runs_after: list[float] = Field(default_factory=list, description="tokens/s, each run.")
    seq_len: int | None = None
    flops_per_token_before: int | None = None
    flops_per_token_after: int | None = None
    measured_speedup: float | None = None
    expected_speedup: float | None = Field(
        None,
        description="FLOPs per token of the original's forward / the compressed one's: the "
        "speed-up that the removed work allows.",
    )
    flag: str | None = Field(
        None,
        description="Why the measurement is not a result (outside what the arithmetic "
        "allows); None when it is.",
    )


class DataInfo(_Model):
    source: str
    sha256: str
    calib_tokens: int
    eval_tokens: int
    validation_tokens: int
    seq_len: int
    calib_windows: int
    validation_windows: int
    eval_windows: int
    calib_sha256: str
    eval_sha256: str
    disjoint: bool
    n_over_d: float = Field(..., description="Calibration tokens (fit part) / hidden size.")
    reservoir_size: int | None = None


class GateRule(_Model):
    name: str
    limit: float
    value: float
    passed: bool
    comparison: Literal["<=", ">="] = Field("<=", description="passed when value <cmp> limit")


class Agreement(_Model):
    """How often the compressed model predicts like the original (linearize.agreement)."""

    kl: float = Field(..., description="Mean per-token KL(original || compressed), nats.")
    top1_agreement: float = Field(..., description="Share of positions with the same argmax.")
    top5_contains_top1: float = Field(
        ..., description="Share of positions whose original argmax is in the compressed top-5."
    )
    positions: int
    top_k: int = Field(..., description="Original tokens kept per position for the KL.")
    definition: str


class GenerationPair(_Model):
    prompt: str
    original: str
    compressed: str
    common_prefix: int


class GenerationCheck(_Model):
    """Greedy continuations of the same prompts by both models (linearize.generation)."""

    exact_match: float = Field(..., description="Share of prompts with identical continuations.")
    mean_common_prefix: float = Field(..., description="Mean leading tokens in common.")
    prompts: int
    new_tokens: int
    pairs: list[GenerationPair] = Field(default_factory=list)
    definition: str


class TaskResult(_Model):
    """One lm-evaluation-harness task on the original and the reloaded compressed model."""

    task: str
    original: dict[str, float | int | None]
    compressed: dict[str, float | int | None]
    retained_pct: float | None = Field(
        None, description="100 * compressed acc / original acc (None if the original scored 0)."
    )


class Gate(_Model):
    passed: bool
    rules: list[GateRule]


class CurvePoint(_Model):
    """One budget k the search of layers=max measured (linearize.search): quality against size.

    Trials are measured on the validation slice (the evaluation windows choose nothing); the
    chosen k's checkpoint is then measured on the evaluation windows like any other."""

    k: int
    layers: list[int]
    method: str = Field(..., description="fit | remove")
    healed: bool = Field(..., description="False: an unhealed probe; True: fully healed.")
    params: int = Field(..., description="Parameters of the trial model.")
    params_removed: int
    perplexity: float = Field(..., description="Validation slice.")
    ppl_increase_pct: float = Field(..., description="Against the original on the same slice.")
    kl: float | None = None
    top1_agreement_pct: float | None = None
    texts: dict[str, float] = Field(
        default_factory=dict, description="Perplexity on named extra texts (e.g. general text)."
    )
    tasks_retained_pct: dict[str, float] = Field(
        default_factory=dict, description="Task accuracy retained (the checkpoint's k only)."
    )
    passed: bool = Field(..., description="Whether every searched gate passed on this trial.")
    seconds: float = Field(..., description="Wall time of the trial.")
    chosen: bool = False


class Execution(_Model):
    """How the job ran: all layers resident, or streamed one decoder layer at a time."""

    mode: str = Field(..., description="resident | streamed")
    reason: str = ""
    device: str
    memory_budget_bytes: int = Field(..., description="What the job may keep on the device.")
    weight_bytes: int = Field(..., description="The model's weights in the run dtype.")
    largest_layer_bytes: int
    peak_memory_bytes: int = Field(
        ..., description="Peak GPU memory allocated (CUDA), else the process's peak RSS."
    )
    spilled_caches: int = Field(0, description="Activation caches written to disk.")
    planned_peak_bytes: int | None = Field(
        None, description="The memory plan's total: what the engine plans to hold at most."
    )
    memory_plan: dict[str, int] = Field(
        default_factory=dict,
        description="The memory plan's items (weights held, statistics, logits, healing state, "
        "activation caches, ...) in bytes; they sum to planned_peak_bytes.",
    )
    start_memory_bytes: int | None = Field(
        None,
        description="The process's memory (as peak_memory_bytes measures it) once the "
        "model's code was imported, before any weight was read: the peak minus this is what "
        "the job added.",
    )
    peak_rises: dict[str, int] = Field(
        default_factory=dict,
        description="What each timed stage added to the measured peak while it ran, in bytes "
        "(summed over its runs; rises under 1 MiB are not credited): where the memory went.",
    )
    peak_stage: str | None = Field(
        None,
        description="The last stage that raised the peak: where the measured peak was reached.",
    )


class Resumed(_Model):
    """What a retried or re-run job took over from an interrupted run (linearize.resume)."""

    stages: list[str] = Field(
        default_factory=list, description="The stages read back instead of recomputed, in order."
    )
    healing_step: int | None = Field(None, description="The healing checkpoint's step resumed.")
    refused: str | None = Field(
        None, description="Why the interrupted run's state was refused (the run started clean)."
    )


class Report(_Model):
    schema_version: str = REPORT_SCHEMA_VERSION
    kind: str
    model: ModelInfo
    replaced_layers: list[int] = Field(default_factory=list)
    format: str | None = None
    method: str | None = None
    selection: dict[str, Any] = Field(
        default_factory=dict,
        description="How the layers were chosen; `healing` (when healing ran) holds its steps, "
        "seconds, first and last training loss, `curve`: at most 200 [step, mean loss of the "
        "bucket of steps ending there] pairs, and the validation perplexity before and after.",
    )
    linearity: list[LayerLinearity] = Field(default_factory=list)
    linearity_notes: str = ""
    perplexity: Perplexity | None = None
    eval_texts: list[TextPerplexity] = Field(
        default_factory=list,
        description="Texts unlike the calibration text, measured before and after: the "
        "--eval-data texts, else the general mixture's held-out part as `general`.",
    )
    throughput: Throughput | None = None
    data: DataInfo | None = None
    agreement: Agreement | None = None
    generation: GenerationCheck | None = None
    tasks: list[TaskResult] = Field(default_factory=list)
    gate: Gate | None = None
    execution: Execution | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    output_dir: str | None = None
    notes: list[str] = Field(default_factory=list)
    resumed: Resumed | None = None
    compare: list[dict[str, Any]] | None = None
    curve: list[CurvePoint] = Field(
        default_factory=list,
        description="layers=max: every k the search measured, in the order measured.",
    )
