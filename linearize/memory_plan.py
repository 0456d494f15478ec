"""The memory plan: every long-lived allocation of a job, sized before the heavy work.

`--memory-budget` bounds the process, not only the layers: from the checkpoint's shard headers,
the model config and the job spec, `plan_memory` lists what the engine will hold at once (the
resident trunk, the output head, the decoder layers in memory, one batch's forward temporaries,
the d x d float64 statistics, one head step's logits, the healing state, the activation caches
and a reserve for the process's own bookkeeping) and chooses the sizes that make their sum fit:

1. the batch size (4 windows, down to 1),
2. the rows of one head step (a whole window, down to MIN_HEAD_ROWS positions),
3. how many layers after the cut healing trains (NEIGHBOUR_LAYERS, down to 0),
4. the activation caches: whatever is left, the rest spills to disk.

When even the smallest of each does not fit, the job is refused before any weight is read, with
the items and their sizes in the message. The items are summed although they do not all live at
the same time (the analysis's statistics and the healing state never do): the plan is a bound.
The report states the plan beside the measured peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from linearize.errors import BudgetError

MAX_BATCH = 4  # windows per batch (linearize.stack.LayerStack's default)
MAX_HEAD_BYTES = 256 * 2**20  # one head step's logits at most, however large the budget
MIN_HEAD_ROWS = 16  # positions per head step below which the head runs too slowly
LOGIT_COPIES = 3  # the logits, cross-entropy's log-softmax, an observer's softmax or top-k
TRAINING_COPIES = 4  # per trained byte: gradient, Adam's two moments, the snapshot to restore
RESERVOIR = 2048  # TwoNN reservoir rows (linearize.analysis.DEFAULT_RESERVOIR)
TWONN_BLOCK = 256  # rows of the TwoNN distance block (linearize.linearity)
# What no item names: tokenized text, Python objects, the allocator's free lists, the kernels'
# scratch space. In a streamed compress at d = 512 the resident set beyond the items grew by
# ~12 MiB once the text was read and by up to ~45 MiB later (freed pages the allocator keeps);
# the reserve covers the first, the summed items (never all alive at once) the rest.
PROCESS_RESERVE = 32 * 2**20


@dataclass(frozen=True)
class Workload:
    """What the job will do, as far as memory goes (from the spec)."""

    seq_len: int
    activation_tokens: int  # tokens whose hidden states a pass carries at once (all sets)
    heal: bool = False
    neighbours: int = 4  # layers after the cut healing would train (NEIGHBOUR_LAYERS)
    kept_layers: int = 1  # changed layers held in memory besides the one being run
    heal_loss: str = "mse"  # a resident heal's loss: "kl" computes two windows' logits a step


@dataclass(frozen=True)
class ModelShape:
    """The sizes the plan needs, from the config and the shard headers (linearize.placement)."""

    hidden: int
    ffn: int
    heads: int
    vocab: int
    itemsize: int
    weight_bytes: int
    largest_layer_bytes: int
    trunk_bytes: int  # embeddings, final norm and everything else outside the layers and head
    head_bytes: int  # an untied output head (0 when tied to the embeddings)
    carrier_bytes: int  # the parameters a heal trains in the fold target (o_proj + down_proj)


@dataclass
class MemoryPlan:
    budget: int
    items: dict[str, int] = field(default_factory=dict)  # name -> bytes
    batch_size: int = MAX_BATCH
    head_rows: int = 0
    neighbours: int = 0

    @property
    def total(self) -> int:
        return sum(self.items.values())

    @property
    def cache_bytes(self) -> int:
        return self.items.get("activation caches", 0)

    def as_dict(self) -> dict:
        return {
            "items": dict(self.items),
            "total_bytes": self.total,
            "batch_size": self.batch_size,
            "head_rows": self.head_rows,
            "healed_neighbours": self.neighbours,
        }


def plan_memory(shape: ModelShape, work: Workload, budget: int, *, streamed: bool) -> MemoryPlan:
    """The sizes that fit `budget`; BudgetError when the smallest do not (streamed only: a
    resident job was asked for, or fits anyway, and its plan is reported as it is)."""
    plan = least_plan(shape, work, budget, streamed)
    if streamed and plan.total > budget:
        raise BudgetError(refusal(plan))
    _grow_batch(plan, shape, work)
    _grow_head_rows(plan, shape, work)
    _grow_healing(plan, shape, work, streamed)
    wanted = work.activation_tokens * shape.hidden * shape.itemsize
    plan.items["activation caches"] = max(0, min(wanted, budget - plan.total))
    return plan


def least_plan(shape: ModelShape, work: Workload, budget: int, streamed: bool) -> MemoryPlan:
    """The smallest sizes: one window per batch, MIN_HEAD_ROWS per head step, healing that
    trains the maps' carriers only, every activation cache on disk."""
    plan = MemoryPlan(budget=budget, head_rows=min(work.seq_len, MIN_HEAD_ROWS), batch_size=1)
    plan.items = fixed_items(shape, work, budget, streamed)
    plan.items["forward (one batch)"] = forward_bytes(shape, work.seq_len, 1)
    plan.items["logits (one head step)"] = logits_bytes(shape, plan.head_rows)
    plan.items["healing state"] = healing_bytes(shape, 0) if work.heal else 0
    if work.heal and not streamed:
        plan.items["healing loss (one step)"] = loss_bytes(shape, work)
    return plan


def loss_bytes(shape: ModelShape, work: Workload) -> int:
    """A resident heal's loss on one window. KL: the teacher's and the student's logits, the
    student's log-softmax and its gradient (the teacher's top-k targets are taken from its
    logits each step, never stored). Centred-logit MSE: the d x d metric, no logits."""
    if work.heal_loss == "kl":
        return 4 * work.seq_len * shape.vocab * 4
    return shape.hidden * shape.hidden * 4


def fixed_items(shape: ModelShape, work: Workload, budget: int, streamed: bool) -> dict[str, int]:
    """What the job holds whatever the sizes chosen."""
    if streamed:
        layers = (1 + work.kept_layers) * shape.largest_layer_bytes
        weights = {
            "embeddings and final norm": shape.trunk_bytes,
            "LM head": shape.head_bytes,
            f"decoder layers ({1 + work.kept_layers} held)": layers,
        }
    else:
        weights = {"weights (all resident)": shape.weight_bytes}
    return {
        **weights,
        "statistics (d x d float64)": statistics_bytes(shape.hidden),
        # the writer holds one shard at most, and never more than the model
        "checkpoint writer (one shard)": min(shard_bytes(budget, streamed), shape.weight_bytes),
        "process reserve": PROCESS_RESERVE,
    }


def shard_bytes(budget: int, streamed: bool) -> int:
    """Bytes per written shard: the writer holds one shard, so a streamed job's shards are
    an eighth of its budget (16 MiB to 2 GiB); a resident job writes 200 MB shards."""
    if not streamed:
        return 200 * 10**6
    return max(16 * 2**20, min(2 * 2**30, budget // 8))


def statistics_bytes(d: int) -> int:
    """The analysis's peak: three d x d float64 accumulators, an eigendecomposition's two
    d x d outputs and workspace, and the TwoNN reservoir in float32 and float64 with one
    distance block. A span's fit needs fewer (two Grams and a solve)."""
    grams = 6 * d * d * 8
    reservoir = RESERVOIR * d * (4 + 2 * 8) + TWONN_BLOCK * RESERVOIR * 8
    return grams + reservoir


def forward_bytes(shape: ModelShape, seq_len: int, batch: int) -> int:
    """One decoder layer's forward temporaries on a batch: the MLP's three ffn-wide tensors,
    a few d-wide ones (norms, q/k/v, residual), the attention scores and their softmax (float32
    in eager attention), and the batch read from and written to the activation cache."""
    tokens = batch * seq_len
    per_token = (3 * shape.ffn + 8 * shape.hidden) * shape.itemsize
    scores = 2 * batch * shape.heads * seq_len * seq_len * 4
    return tokens * per_token + scores


def logits_bytes(shape: ModelShape, rows: int) -> int:
    return LOGIT_COPIES * rows * shape.vocab * 4


def healing_bytes(shape: ModelShape, neighbours: int) -> int:
    trained = shape.carrier_bytes + neighbours * shape.largest_layer_bytes
    return TRAINING_COPIES * trained


def _grow_batch(plan: MemoryPlan, shape: ModelShape, work: Workload) -> None:
    for batch in range(MAX_BATCH, 1, -1):
        if _fits_with(plan, "forward (one batch)", forward_bytes(shape, work.seq_len, batch)):
            plan.batch_size = batch
            return


def _grow_head_rows(plan: MemoryPlan, shape: ModelShape, work: Workload) -> None:
    """A whole window per head step when it fits (capped at MAX_HEAD_BYTES), else fewer rows."""
    room = plan.budget - plan.total + plan.items["logits (one head step)"]
    rows = min(work.seq_len, room // logits_bytes(shape, 1), MAX_HEAD_BYTES // (4 * shape.vocab))
    plan.head_rows = max(plan.head_rows, int(rows))
    plan.items["logits (one head step)"] = logits_bytes(shape, plan.head_rows)


def _grow_healing(plan: MemoryPlan, shape: ModelShape, work: Workload, streamed: bool) -> None:
    """As many trained layers after the cut as fit: their weights stay in memory (streamed)
    and each trained byte costs TRAINING_COPIES more."""
    if not work.heal:
        return
    layer = shape.largest_layer_bytes if streamed else 0
    for count in range(work.neighbours, 0, -1):
        cost = healing_bytes(shape, count) - healing_bytes(shape, 0) + count * layer
        if plan.total + cost <= plan.budget or not streamed:
            plan.neighbours = count
            plan.items["healing state"] = healing_bytes(shape, count)
            if streamed:
                plan.items["healed layers (held)"] = count * layer
            return


def _fits_with(plan: MemoryPlan, name: str, size: int) -> bool:
    if plan.total - plan.items[name] + size > plan.budget:
        return False
    plan.items[name] = size
    return True


def refusal(plan: MemoryPlan) -> str:
    from linearize.memory import format_size

    listed = ", ".join(f"{name} {format_size(size)}" for name, size in plan.items.items() if size)
    return (
        f"the memory budget {format_size(plan.budget)} is smaller than the least this job needs, "
        f"{format_size(plan.total)}: {listed}; give at least {format_size(plan.total)}"
    )
