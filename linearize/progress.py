"""Progress reporting: the pipeline emits ProgressEvents; the sink decides what to show.

The CLI's sink draws tqdm bars with ETA, the worker's sink stores job events and raises
`Cancelled` when the job was cancelled, which stops the pipeline at the next step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from api_schemas import ProgressEvent

ProgressSink = Callable[[ProgressEvent], None]


class Stage:
    """One named stage; `advance` emits at most ~10 events/s plus the first and the last."""

    def __init__(self, sink: ProgressSink | None, name: str, total: int, message: str = ""):
        self.sink, self.name, self.total, self.message = sink, name, total, message
        self.current = 0
        self.stopped = False
        self._last_emit = 0.0

    def advance(self, steps: int = 1, message: str | None = None) -> None:
        self.current += steps
        if message is not None:
            self.message = message
        now = time.monotonic()
        if self.current >= self.total or now - self._last_emit > 0.1:
            self._last_emit = now
            self.emit()

    def stop(self, message: str) -> None:
        """The stage ended before its total (a time budget): the bar keeps the count done."""
        self.stopped = True
        self.message = message
        self.emit()

    def emit(self) -> None:
        if self.sink is not None:
            self.sink(
                ProgressEvent(
                    stage=self.name, current=self.current, total=self.total, message=self.message
                )
            )


class Progress:
    def __init__(self, sink: ProgressSink | None = None):
        self.sink = sink

    @contextlib.contextmanager
    def stage(self, name: str, total: int = 0, message: str = "") -> Iterator[Stage]:
        stage = Stage(self.sink, name, total, message)
        stage.emit()
        yield stage
        if stage.current < stage.total and not stage.stopped:
            stage.current = stage.total
        stage.emit()

    def note(self, name: str, message: str) -> None:
        """A one-off event (no bar), e.g. the selection that was made."""
        if self.sink is not None:
            self.sink(ProgressEvent(stage=name, current=0, total=0, message=message))


class TqdmSink:
    """Terminal bars, one per stage, with ETA. Used by the CLI only."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._bar = None
        self._stage = None

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        key = (event.stage, event.total, event.message if not event.total else "")
        if event.current == 0 and key != self._stage:
            self.close()
            self._stage = key
            if event.total:
                self._bar = tqdm(total=event.total, desc=f"{event.stage:>9}", dynamic_ncols=True)
            elif event.message:
                tqdm.write(f"{event.stage:>9}: {event.message}")
        if self._bar is None:
            return
        self._bar.n = event.current
        if event.message:
            self._bar.set_postfix_str(event.message, refresh=False)
        self._bar.refresh()
        if event.current >= event.total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
