"""The engine's stages for experiments on a resident model (benchmarks only).

Benchmarks try variants of one stage on a model they hold and change in place; the pipeline's
stages take a LayerStack (linearize.stack). `BenchJob` runs the same stage functions on
`LayerStack.of(model)`, so an experiment measures exactly what `compress` does.
"""

from __future__ import annotations

from linearize import pipeline, search
from linearize.healing import TeacherCache, capture_teacher
from linearize.job import Job
from linearize.progress import Progress
from linearize.stack import LayerStack


class BenchJob:
    def __init__(self, spec):
        self.job = Job(spec, Progress(None))
        self.spec = spec

    @classmethod
    def bundled(cls, data, k: int, **settings) -> BenchJob:
        """A k-layer compress of the bundled model on the text file `data`."""
        from api_schemas import CompressSpec, DataSpec

        spec = CompressSpec(
            model="smollm2-135m", layers=k, data=DataSpec(path=str(data)), **settings
        )
        return cls(spec)

    def load(self, source: str):
        return self.job.load(source)

    def for_layers(self, k: int) -> BenchJob:
        """The same settings with a budget of k layers, on the model this job loaded (its
        placement: the stages size their caches by it, and only `load` sets it)."""
        other = BenchJob(self.spec.model_copy(update={"layers": k}))
        other.job.placement = self.job.placement
        return other

    def windows(self, tokenizer, eval_tokens, heal_tokens=None):
        return self.job.windows(tokenizer, eval_tokens, heal_tokens=heal_tokens)

    def baseline_and_analysis(self, model, windows, tokenizer):
        """(baseline, baseline validation, Analysis) of a resident model."""
        baseline, baseline_val, analysis, _ = pipeline.baseline_and_analysis(
            self.job, LayerStack.of(model), windows, tokenizer
        )
        return baseline, baseline_val, analysis

    def select(self, model, windows, analysis, baseline_val, n_layers):
        return search.select(
            self.job, LayerStack.of(model), windows, analysis, baseline_val, n_layers
        )

    def replace(self, model, windows, indices):
        """Fit and apply the maps in place; the carriers' parameters."""
        return pipeline.replace(self.job, LayerStack.of(model), windows, indices)

    def capture_teacher(self, model, windows, indices, ids=None) -> TeacherCache:
        """The teacher at the injection point with its final hidden states, as plain tensors,
        on `ids` (default: the fit windows)."""
        start = pipeline.injection_point(self.spec, indices)
        cache = capture_teacher(model, windows.fit if ids is None else ids, start)
        return TeacherCache(start, cache.inputs.data, cache.targets.data, cache.kind)

    def close(self) -> None:
        self.job.close()
