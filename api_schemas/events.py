"""Progress events: what the pipeline emits and the service stores and streams."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ProgressEvent(BaseModel):
    """One step of progress inside a pipeline stage. `total` 0 means unknown."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: str = Field(
        ...,
        description="load | data | baseline | analyze | select | fit | heal | surgery | evaluate | save | verify | behaviour | throughput",
    )
    current: int = 0
    total: int = 0
    message: str = ""

    @property
    def percent(self) -> float:
        return 100.0 * self.current / self.total if self.total else 0.0
