"""How the compressed model behaves next to the original: the glue between a compress run and
the three measures (linearize.agreement, linearize.generation, linearize.tasks).

The pipeline calls, in order: `check()` before loading anything (unknown tasks fail first),
`measure_original(model)` while the original model is resident (generation and tasks),
`reference.update` on each chunk of the original's evaluation logits, `meter().update` on each
chunk of the reloaded checkpoint's, `measure_compressed(model)`, and `fill(report)`.
"""

from __future__ import annotations

from api_schemas.report import Agreement, GenerationCheck, GenerationPair, TaskResult
from linearize.agreement import DEFINITION as AGREEMENT_DEFINITION
from linearize.agreement import AgreementMeter, Reference


class Behaviour:
    def __init__(self, spec, timings: dict[str, float]):
        self.spec = spec
        self.timings = timings  # the job's: generation, agreement and tasks are booked there
        self.tokenizer = None
        self.reference = Reference()
        self._meter: AgreementMeter | None = None
        self._manager = None
        self._prompts = None
        self._original_continuations = None
        self._original_tasks: dict = {}
        self._compressed_tasks: dict = {}
        self._generation = None

    def timed(self, name: str):
        from linearize.job import timed_into

        return timed_into(self.timings, name)

    def check(self) -> None:
        """Refuse unknown tasks or a missing task directory before any model work."""
        if self.spec.tasks:
            from linearize.tasks import check_tasks

            with self.timed("tasks"):
                self._manager = check_tasks(self.spec.tasks, self.spec.task_dir)

    def measure_original(self, model, tokenizer, windows) -> None:
        self.tokenizer = tokenizer
        if self.spec.generation_prompts:
            from linearize.generation import evaluation_prompts, greedy_continuations

            with self.timed("generation"):
                self._prompts = evaluation_prompts(windows.eval, self.spec.generation_prompts)
                self._original_continuations = greedy_continuations(model, self._prompts)
        if self.spec.tasks:
            self._original_tasks = self._run_tasks(model)

    def timed_hook(self, hook, name: str = "agreement"):
        """`hook` with its time booked under `name` (kept out of the evaluation's own timing)."""

        def timed_hook(chunk):
            with self.timed(name):
                hook(chunk)

        return timed_hook

    def reference_hook(self):
        return self.timed_hook(self.reference.update)

    def cached_reference(self, key: str, model, windows, perplexity) -> None:
        """The reference from the cache entry `key`, else one pass of the original (saved)."""
        from linearize import cache

        tensors = cache.load_reference(key, self.reference.top_k)
        if tensors is not None:
            self.reference = Reference.from_tensors(tensors)
            return
        perplexity(model, windows.eval, "agreement_reference", "baseline", self.reference_hook())
        self.save_reference(key)

    def save_reference(self, key: str) -> None:
        from linearize import cache

        cache.save_reference(key, self.reference.top_k, self.reference.tensors())

    def meter_hook(self):
        self._meter = AgreementMeter(self.reference)
        return self.timed_hook(self._meter.update)

    def measure_compressed(self, model) -> None:
        if self._prompts is not None:
            from linearize.generation import compare_continuations, greedy_continuations

            with self.timed("generation"):
                compressed = greedy_continuations(model, self._prompts)
            self._generation = compare_continuations(
                self._prompts, self._original_continuations, compressed, self.tokenizer
            )
        if self.spec.tasks:
            self._compressed_tasks = self._run_tasks(model)

    def _run_tasks(self, model) -> dict:
        from linearize.tasks import run_tasks

        with self.timed("tasks"):
            return run_tasks(
                model, self.tokenizer, self.spec.tasks, self._manager, max_length=self.spec.seq_len
            )

    def fill(self, report) -> None:
        """Agreement, generation and task results into the report."""
        from linearize.generation import DEFINITION as GENERATION_DEFINITION
        from linearize.tasks import retained_pct

        if self._meter is not None:
            result = self._meter.result()
            report.agreement = Agreement(
                kl=result.kl,
                top1_agreement=result.top1_agreement,
                top5_contains_top1=result.top5_contains_top1,
                positions=result.positions,
                top_k=result.top_k,
                definition=AGREEMENT_DEFINITION,
            )
        if self._generation is not None:
            g = self._generation
            report.generation = GenerationCheck(
                exact_match=g.exact_match,
                mean_common_prefix=g.mean_common_prefix,
                prompts=g.prompts,
                new_tokens=g.new_tokens,
                pairs=[GenerationPair(**pair) for pair in g.pairs],
                definition=GENERATION_DEFINITION,
            )
        report.tasks = [
            TaskResult(
                task=task,
                original=self._original_tasks[task],
                compressed=self._compressed_tasks[task],
                retained_pct=retained_pct(self._original_tasks[task], self._compressed_tasks[task]),
            )
            for task in getattr(self.spec, "tasks", [])
        ]
