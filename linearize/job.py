"""One run's context, shared by every stage: spec, progress, timings, notes, memory placement.

The stages themselves live with their subject (analysis, fitting, healing, evaluation,
checkpoint); `Job` gives them the model as a LayerStack placed for the memory budget, the
windows, an activation-cache planner and the spill directory that `close` always removes.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from linearize.progress import Progress

log = logging.getLogger(__name__)

PEAK_RISE_FLOOR = 2**20  # bytes: a stage that raised the peak by less is not credited


@contextmanager
def timed_into(timings: dict[str, float], name: str):
    """Add the block's wall time to timings[name] (seconds, 3 decimals)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 3)


class Job:
    def __init__(self, spec, progress: Progress):
        from linearize.memory import peak_rss_bytes

        self.spec = spec
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self.placement = None
        self._spill = None
        self._planner = None
        self.resume_slot: str | None = None  # where a compress keeps its state (linearize.resume)
        self.resume = None  # the open linearize.resume.Resume of a compress
        # Maps a trial already fitted on the unchanged model, by replaced indices: `--method
        # auto` fits the chosen layers to measure the fit, and the job's own replacement of the
        # same layers takes them instead of a second fit pass (linearize.pipeline).
        self.fitted_maps: dict[tuple[int, ...], dict] = {}
        # What each timed stage added to the process's peak memory (the report's
        # execution.peak_rises), and the last stage that raised it: where the peak was reached.
        self.peak_rises: dict[str, int] = {}
        self.peak_stage: str | None = None
        self._last_peak = peak_rss_bytes()  # the peak when the last stage ended
        self._device = None  # the model's device, once loaded (the peak is measured there)

    @contextmanager
    def timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 3)
            self._mark_peak(name)

    def _mark_peak(self, name: str) -> None:
        """Credit the stage that just ended with what it added to the peak. Rises under
        PEAK_RISE_FLOOR are the allocator's page-level noise, not a stage's doing."""
        from linearize.memory import peak_bytes

        peak = peak_bytes(self._device or "cpu")
        rise, self._last_peak = peak - self._last_peak, max(peak, self._last_peak)
        if rise >= PEAK_RISE_FLOOR:
            self.peak_rises[name] = self.peak_rises.get(name, 0) + rise
            self.peak_stage = name

    def close(self) -> None:
        """Remove every spilled activation file, whatever happened to the run."""
        if self._spill is not None:
            self._spill.close()

    # --- inputs ---------------------------------------------------------------------------------

    def text(self):
        """The data source, read once; read before the model so bad data fails in a second."""
        from linearize.data import load_source

        if not hasattr(self, "_text"):
            self._text = load_source(self.spec.data)
        return self._text

    def load(self, source: str, *, activation_tokens: int = 0):
        """The model as a LayerStack (`loaded.stack`), resident or streamed for the budget."""
        from linearize.memory import peak_bytes, reset_peak
        from linearize.placement import open_stack

        self.text()
        self.spill()  # a bad --host-budget fails before the model is read
        with self.timed("load"), self.progress.stage("load", total=1, message=source):
            loaded, placement = open_stack(
                source,
                dtype=self.spec.dtype,
                device=self.spec.device,
                use_cache=getattr(self.spec, "use_cache", True),
                streaming=self.spec.streaming,
                memory_budget=self.spec.memory_budget,
                activation_tokens=activation_tokens,
                workload=self.workload(activation_tokens),
            )
        if self.placement is None:  # the job's model (a reload keeps the job's placement)
            self.placement = placement
            self._device = loaded.stack.device
            reset_peak(self._device)
            if self._device.type == "cuda":  # the peak counts from here on; the load was host RSS
                self.peak_rises, self.peak_stage = {}, None
                self._last_peak = peak_bytes(self._device)
        return loaded

    def windows(
        self, tokenizer, eval_tokens: int | None, heal_tokens: int | None = None, heal_at_most=False
    ):
        """Token windows; healing windows beyond the fit windows only when heal_tokens is given
        (linearize.data.build_windows)."""
        from linearize.data import build_windows

        with self.timed("data"), self.progress.stage("data", total=1):
            return build_windows(
                tokenizer,
                self.text(),
                calib_tokens=self.spec.calib_tokens,
                eval_tokens=eval_tokens,
                seq_len=self.spec.seq_len,
                validation_fraction=self.spec.validation_fraction,
                heal_tokens=heal_tokens,
                heal_at_most=heal_at_most,
            )

    # --- memory ---------------------------------------------------------------------------------

    def spill(self):
        from linearize import cache
        from linearize.activations import Spill
        from linearize.memory import parse_size

        if self._spill is None:
            text = self.spec.host_budget
            always = text is not None and float(_number(text)) == 0
            host = None if text is None or always else parse_size(text)
            self._spill = Spill(parent=cache.cache_dir() / "spill", host_budget=host, always=always)
        return self._spill

    def workload(self, activation_tokens: int):
        """What the memory plan sizes (linearize.memory_plan): the windows' length, the
        hidden states the caches could hold (the passes' windows, and for healing the teacher
        pass's three caches of the healing text, twice: the default healing text takes half of
        the caches' room), and whether healing trains layers the job must keep."""
        from linearize.memory_plan import Workload
        from linearize.pipeline import DEFAULT_HEAL_TOKENS, healing_budget

        spec = self.spec
        heal = hasattr(spec, "heal_steps") and healing_budget(spec) is not None
        heal_tokens = (spec.heal_tokens or DEFAULT_HEAL_TOKENS) if heal else 0
        return Workload(
            seq_len=spec.seq_len,
            activation_tokens=activation_tokens + 6 * heal_tokens,
            heal=heal,
            kept_layers=1 if hasattr(spec, "heal_steps") else 0,
            heal_loss=getattr(spec, "heal_loss", "mse"),
        )

    def planner(self, stack):
        """Activation caches go on the device while the memory plan's share for them lasts."""
        from linearize.activations import CachePlanner

        if self._planner is None:
            free = self.placement.plan.cache_bytes
            self._planner = CachePlanner(stack.device, free, self.spill())
        return self._planner

    @contextmanager
    def pass_stage(self, name: str, stack, windows: dict, message: str = ""):
        """A progress bar over one layer-by-layer pass (every window through every layer)."""
        from linearize.evaluation import pass_length

        with self.progress.stage(name, total=pass_length(stack, windows), message=message) as st:
            yield st


def _number(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit() or ch == ".") or "0"
