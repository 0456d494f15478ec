"""Resumable compress jobs: what an interrupted run leaves behind, and a retried run takes over.

A compress job writes durable state into a *slot* of the engine's cache as it completes its
stages: the baseline and the analysis (linearize.cache's own entries), the selection, the fitted
maps, the perplexities before healing, and healing checkpoints every N steps or M seconds (the
trained parameters, Adam's state, the step, the losses so far, the windows' RNG state: small,
never the teacher's cached states, which the retried run recomputes in one pass). A retried run
opens the same slot and skips what is there; its healing continues from the last checkpoint and
draws the same windows in the same order, so it ends where an uninterrupted run would.

The slot is named by the caller (the service: the job id) or by the job's arguments (the CLI: the
spec as given, so running the same command again resumes it). Its manifest keys the state on the
engine version, the model's fingerprint, the data's hash and the spec; when any of them differs
the state is refused and discarded, and the run starts clean, saying why. The slot is removed when
the job succeeds or is cancelled. With a shared store installed (linearize.cache.set_remote),
every file is also published as an entry `resume/<slot>/<file>`, so another host resumes it.

Healing checkpoints alternate between two files, so a kill while one is written leaves the other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from api_schemas.report import Resumed

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STEPS_ENV = "LINEARIZE_HEAL_CHECKPOINT_STEPS"
SECONDS_ENV = "LINEARIZE_HEAL_CHECKPOINT_SECONDS"
DEFAULT_EVERY_STEPS = 50
DEFAULT_EVERY_SECONDS = 60.0
MANIFEST = "manifest.json"
HEAL_FILES = ("heal-0.pt", "heal-1.pt")
JSON_STAGES = {"selection": "selection", "heal_before": "perplexity before healing"}
STATE_FILES = (MANIFEST, *(f"{name}.json" for name in JSON_STAGES), "maps.pt", *HEAL_FILES)
WHAT_CHANGED = {
    "engine": "the engine version",
    "model": "the model's fingerprint",
    "data": "the data's hash",
    "spec": "the spec",
}


def slot_for_arguments(spec) -> str:
    """The CLI's slot: the spec exactly as given (paths included)."""
    text = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    return "args-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def key_parts(stack, windows, spec) -> dict:
    """What the state depends on; a resumed run must match every part."""
    from linearize import __version__, cache
    from linearize.data import hash_tokens

    if stack.streamed:
        model = "shards:" + cache.shards_fingerprint(stack.model, stack.weights)
    else:
        model = cache.model_fingerprint(stack.model)
    settings = spec.model_dump(mode="json")
    settings.pop("model")  # where the model and data live may differ between hosts and
    data = settings.pop("data")  # attempts; their contents are the other parts
    settings["text_field"] = data.get("text_field")
    return {
        "engine": (
            f"linearize {__version__}, resume format {FORMAT_VERSION}, torch {torch.__version__}, "
            f"{stack.device.type} {stack.dtype}"
        ),
        "model": model,
        "data": _sha256(
            [windows.source.sha256, windows.calib_sha256, windows.eval_sha256]
            + [hash_tokens(windows.heal)]
        ),
        "spec": _sha256(settings),
    }


def _sha256(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def open_resume(job, stack, windows) -> Resume:
    """The job's slot, its state checked against this run (refused state is discarded)."""
    from linearize import cache

    if job.resume_slot is None:
        return Resume.disabled(job)
    directory = cache.cache_dir() / "resume" / job.resume_slot
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a cache that cannot be written must not fail the job
        log.warning("no resumable state for this job: %s", exc)
        return Resume.disabled(job)
    state = Resume(directory, f"resume/{job.resume_slot}", job)
    state.take_over(key_parts(stack, windows, job.spec))
    return state


class Resume:
    """One job's slot; with `directory` None (no cache, or not a compress job) it keeps nothing."""

    def __init__(self, directory: Path | None, name: str, job):
        self.directory, self.name, self.job = directory, name, job
        self.stages: list[str] = []  # what this run read back, in order
        self.healing_step: int | None = None
        self.refused = ""

    @classmethod
    def disabled(cls, job) -> Resume:
        return cls(None, "", job)

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    # --- the slot ------------------------------------------------------------------------------

    def take_over(self, parts: dict) -> None:
        from linearize import cache

        for file in STATE_FILES:
            if not (self.directory / file).exists():
                cache.fetch_shared_file(f"{self.name}/{file}", self.directory / file)
        cache.hold(self.directory)  # no scratch eviction while the job runs
        manifest = self.load_json(MANIFEST)
        if manifest is not None and manifest.get("parts") != parts:
            changed = [WHAT_CHANGED[k] for k in parts if manifest["parts"].get(k) != parts[k]]
            self.refused = f"{', '.join(changed)} changed since the interrupted run"
            self._note(f"resume refused: {self.refused}; starting clean")
            self._discard_state()
            manifest = None
        if manifest is None:
            self.save_json(MANIFEST, {"format": FORMAT_VERSION, "parts": parts})
        elif len(os.listdir(self.directory)) > 1:
            self._note(f"resuming an interrupted run from its state in {self.directory}")

    def _discard_state(self) -> None:
        for file in STATE_FILES:
            (self.directory / file).unlink(missing_ok=True)

    def clear(self) -> None:
        """The job is over (succeeded or cancelled): nothing is left to resume."""
        if not self.enabled:
            return
        from linearize import cache

        cache.release(self.directory)
        shutil.rmtree(self.directory, ignore_errors=True)
        cache.discard_shared(self.name)

    def info(self) -> Resumed | None:
        if not self.enabled or not (self.stages or self.refused):
            return None
        return Resumed(
            stages=self.stages, healing_step=self.healing_step, refused=self.refused or None
        )

    def _note(self, message: str) -> None:
        log.info(message)
        self.job.notes.append(message)
        self.job.progress.note("resume", message)

    def _read(self, file: str, stage: str, read: Callable[[Path], object]):
        """What `read` makes of the file, or None when it is missing or unreadable."""
        if not self.enabled or not (self.directory / file).is_file():
            return None
        try:
            value = read(self.directory / file)
        except Exception as exc:  # noqa: BLE001 - damaged state is recomputed, never trusted
            log.warning("ignoring unreadable resume state %s: %s", self.directory / file, exc)
            return None
        if value is not None and stage:
            self.stages.append(stage)
            self._note(f"{stage}: taken over from the interrupted run")
        return value

    def _write(self, file: str, write: Callable[[Path], None]) -> None:
        """Atomically (a temporary name, then a rename), then published; never fails the job."""
        if not self.enabled:
            return
        from linearize import cache

        target = self.directory / file
        staging = target.with_name(f".{file}.{uuid.uuid4().hex[:8]}")
        try:
            write(staging)
            os.replace(staging, target)
        except (OSError, TypeError, ValueError) as exc:  # no space, or not serialisable
            log.warning("could not write resume state %s: %s", target, exc)
            return
        finally:
            staging.unlink(missing_ok=True)
        cache.publish_shared_file(f"{self.name}/{file}", target)

    # --- stages ------------------------------------------------------------------------------

    def load_json(self, file: str, stage: str = ""):
        return self._read(file, stage, lambda path: json.loads(path.read_text()))

    def save_json(self, file: str, value) -> None:
        self._write(file, lambda path: path.write_text(json.dumps(value)))

    def json_stage(self, name: str, compute: Callable[[], object]):
        """The stage's JSON result from the slot (`<name>.json`), else computed and saved."""
        file = f"{name}.json"
        value = self.load_json(file, JSON_STAGES[name])
        if value is None:
            value = compute()
            self.save_json(file, value)
        return value

    def load_maps(self, indices: list[int]) -> dict | None:
        """The fitted maps of exactly these layers, if the interrupted run fitted them."""

        def read(path: Path):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            return maps_from_tensors(saved["maps"]) if saved["indices"] == indices else None

        return self._read("maps.pt", "fitted maps", read)

    def save_maps(self, indices: list[int], maps: dict) -> None:
        saved = {"indices": indices, "maps": maps_as_tensors(maps)}
        self._write("maps.pt", lambda path: torch.save(saved, path))

    def healing(self, max_steps: int) -> HealingCheckpoints | None:
        return HealingCheckpoints(self, max_steps) if self.enabled else None


# --- maps as plain tensors (torch.load with weights_only reads nothing else) ----------------------


def maps_as_tensors(maps: dict) -> list[dict]:
    """[{span, kind, weight, bias, attn_weight?, attn_bias?}] of linearize.fitting.fit_spans."""
    from linearize.surgery import OutputFold

    rows = []
    for span, value in maps.items():
        row = {"span": list(span), "kind": "fold" if isinstance(value, OutputFold) else "affine"}
        affine = value.mlp if isinstance(value, OutputFold) else value
        row.update(weight=affine.weight, bias=affine.bias)
        if isinstance(value, OutputFold) and value.attn is not None:
            row.update(attn_weight=value.attn.weight, attn_bias=value.attn.bias)
        rows.append(row)
    return rows


def maps_from_tensors(rows: list[dict]) -> dict:
    from linearize.surgery import AffineMap, OutputFold

    maps = {}
    for row in rows:
        affine = AffineMap(row["weight"], row["bias"])
        if row["kind"] == "fold":
            attn = None
            if row.get("attn_weight") is not None:
                attn = AffineMap(row["attn_weight"], row["attn_bias"])
            affine = OutputFold(mlp=affine, attn=attn)
        maps[tuple(row["span"])] = affine
    return maps


# --- healing checkpoints -------------------------------------------------------------------------


def checkpoint_interval() -> tuple[int, float]:
    """(steps, seconds) between healing checkpoints, from the environment or the defaults."""
    steps = int(os.environ.get(STEPS_ENV) or DEFAULT_EVERY_STEPS)
    seconds = float(os.environ.get(SECONDS_ENV) or DEFAULT_EVERY_SECONDS)
    return max(1, steps), seconds


class HealingCheckpoints:
    """The healing loop's state, saved every N steps or M seconds and at its last step
    (linearize.healing.heal calls `restore` before its first step and `after_step` after each)."""

    def __init__(self, resume: Resume, max_steps: int):
        self.resume, self.max_steps = resume, max_steps
        self.every_steps, self.every_seconds = checkpoint_interval()
        self.saved_step, self.saved_at = 0, 0.0
        self.next_file = 0

    def restore(self, params, optimizer, generator) -> tuple[list[float], float]:
        """(the losses so far, the seconds spent) of the latest intact checkpoint, its state
        loaded into `params`, `optimizer` and `generator`; ([], 0.0) when there is none."""
        found = [self._load(i, params) for i in range(len(HEAL_FILES))]
        usable = [(state["step"], i, state) for i, state in enumerate(found) if state]
        if not usable:
            return [], 0.0
        step, index, state = max(usable, key=lambda item: item[0])
        with torch.no_grad():
            for p, value in zip(params, state["params"], strict=True):
                p.copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        self.saved_step, self.saved_at = step, state["elapsed"]
        self.next_file = 1 - index
        self.resume.healing_step = step
        self.resume.stages.append(f"healing from step {step}")
        self.resume._note(
            f"healing resumed from the checkpoint at step {step} of {self.max_steps} "
            f"({state['elapsed']:.1f} s already spent)"
        )
        return list(state["losses"]), float(state["elapsed"])

    def _load(self, index: int, params) -> dict | None:
        def read(path: Path):
            state = torch.load(path, map_location="cpu", weights_only=True)
            shapes = [tuple(t.shape) for t in state["params"]]
            return state if shapes == [tuple(p.shape) for p in params] else None

        return self.resume._read(HEAL_FILES[index], "", read)

    def after_step(self, params, optimizer, generator, losses: list[float], elapsed: float):
        step = len(losses)
        due = (
            step - self.saved_step >= self.every_steps
            or elapsed - self.saved_at >= self.every_seconds
            or step >= self.max_steps
        )
        if due and step > self.saved_step:
            self.save(params, optimizer, generator, losses, elapsed)

    def save(self, params, optimizer, generator, losses: list[float], elapsed: float) -> None:
        state = {
            "step": len(losses),
            "elapsed": elapsed,
            "losses": list(losses),
            "params": [p.detach().cpu().clone() for p in params],
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "saved_at": time.time(),
        }
        self.resume._write(HEAL_FILES[self.next_file], lambda path: torch.save(state, path))
        self.saved_step, self.saved_at = len(losses), elapsed
        self.next_file = 1 - self.next_file
