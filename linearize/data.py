"""Text sources -> fixed-length token windows, with a disjoint calibration/evaluation split.

The evaluation windows are defined so anyone can reproduce them: read the file as UTF-8 text with
newlines normalised to LF (what `open(path).read()` gives), take the second half by characters, tokenize it with the model's tokenizer and its default special tokens, keep
the first `eval_tokens` tokens and cut them into non-overlapping `seq_len` windows. Calibration
comes from the first half in the same way; its last windows form the validation slice used for
every ranking, selection and tuning decision. Evaluation windows never choose anything.

Healing text: the calibration half without its validation windows, in order: the fit windows,
then the windows that follow the calibration windows in the first half (tokenized from the
start of the half, like calibration). `heal_tokens` takes its first tokens, so 16k healing
tokens at the default 16k calibration are the 12k fit tokens plus the next 4k of the half. Only
healing reads them; the analysis and the fit see the calibration windows alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from linearize.errors import DataError

log = logging.getLogger(__name__)

WIKITEXT_ENV = "LINEARIZE_WIKITEXT"
WIKITEXT_RELATIVE = Path("shared/data/wikitext-2-raw/wiki.test.raw")


@dataclass(frozen=True)
class TextSource:
    name: str
    text: str
    sha256: str


@dataclass
class TokenWindows:
    """Token windows of shape (n_windows, seq_len); `fit` and `validation` partition calibration."""

    fit: object  # LongTensor (n_fit, seq_len)
    validation: object  # LongTensor (n_val, seq_len)
    eval: object | None  # LongTensor (n_eval, seq_len)
    seq_len: int
    source: TextSource
    calib_sha256: str
    eval_sha256: str | None
    heal: object = None  # LongTensor (n_heal, seq_len); None: the fit windows

    def __post_init__(self) -> None:
        if self.heal is None:
            self.heal = self.fit

    @property
    def calibration(self):
        import torch

        return torch.cat([self.fit, self.validation])

    def count(self, part: str) -> int:
        windows = getattr(self, part)
        return 0 if windows is None else windows.numel()


def read_text(path: str | Path, text_field: str = "text") -> TextSource:
    """Read a UTF-8 text file, or a JSONL file whose records carry `text_field`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"data path is not a file: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not valid UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r}); "
            "convert it first, e.g. `iconv -t UTF-8`"
        ) from exc
    # Newlines are normalised as Python's text mode reads files (CRLF/CR -> LF): the shared
    # wikitext file has CRLF endings, and an independent `open(path).read()` must see our text.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if path.suffix in (".jsonl", ".ndjson"):
        text = _join_jsonl(text, text_field, path)
    if not text.strip():
        raise DataError(f"{path} contains no text")
    return TextSource(str(path), text, hashlib.sha256(raw).hexdigest())


def _join_jsonl(content: str, field: str, path: Path) -> str:
    texts = []
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(f"{path}:{lineno}: no string field {field!r}")
        texts.append(record[field])
    return "\n\n".join(texts)


def find_wikitext() -> Path:
    """The shared wikitext-2 test file: $LINEARIZE_WIKITEXT, else ../shared/data beside the repo."""
    candidates = [os.environ.get(WIKITEXT_ENV)]
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidates += [str(base.parent / WIKITEXT_RELATIVE), str(base / WIKITEXT_RELATIVE)]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise DataError(
        "the builtin wikitext2 text was not found: put wiki.test.raw at "
        f"../{WIKITEXT_RELATIVE} or set {WIKITEXT_ENV}=/path/to/wiki.test.raw"
    )


def load_source(data_spec) -> TextSource:
    """Resolve an api_schemas DataSpec to text. The service resolves dataset_id to a path first."""
    if data_spec.path is not None:
        return read_text(data_spec.path, data_spec.text_field)
    if data_spec.builtin == "wikitext2":
        return read_text(find_wikitext())
    if data_spec.dataset_id is not None:
        raise DataError("dataset_id is only resolvable inside the service")
    # Hub datasets are reachable only with network access; we do not try silently.
    raise DataError("no data source given")


def split_halves(text: str) -> tuple[str, str]:
    """Calibration = first half by characters, evaluation = second half: never overlapping."""
    middle = len(text) // 2
    return text[:middle], text[middle:]


def tokenize_windows(tokenizer, text: str, n_tokens: int, seq_len: int, part: str):
    """First n_tokens tokens of `text` cut into non-overlapping seq_len windows."""
    import torch

    if n_tokens < seq_len:
        raise DataError(f"{part}: {n_tokens} tokens is less than one window of seq_len={seq_len}")
    ids = _tokenize_prefix(tokenizer, text, n_tokens)
    if len(ids) < n_tokens:
        raise DataError(
            f"{part} text has only {len(ids)} tokens, {n_tokens} needed "
            f"(use a longer text, or fewer --{part}-tokens)"
        )
    n_windows = n_tokens // seq_len
    if n_windows * seq_len != n_tokens:
        log.info(
            "%s: using %d of %d tokens (whole windows only)", part, n_windows * seq_len, n_tokens
        )
    return torch.tensor(ids[: n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)


def _tokenize_prefix(tokenizer, text: str, n_tokens: int) -> list[int]:
    # Tokenizing a whole book to keep 8k tokens is slow; grow a character prefix instead. The
    # prefix is tokenized exactly as the full text would be up to the cut, except possibly the
    # last few tokens at the cut, which we drop by asking for a margin.
    chars = max(4 * n_tokens, 4096)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=True)["input_ids"]
        if len(ids) >= n_tokens + 8 or chars >= len(text):
            return ids[:n_tokens] if chars < len(text) else ids
        chars *= 2


def build_windows(
    tokenizer,
    source: TextSource,
    *,
    calib_tokens: int,
    eval_tokens: int | None,
    seq_len: int,
    validation_fraction: float = 0.25,
    heal_tokens: int | None = None,
    heal_at_most: bool = False,
) -> TokenWindows:
    """Calibration (fit + validation), evaluation and healing windows. `heal_tokens` None: heal
    on the fit windows; else its first tokens of the calibration half without the validation
    windows (module docstring). More than the half has is an error, or with `heal_at_most` (a
    default, not the user's number) all there is."""
    calib_text, eval_text = split_halves(source.text)
    calib = tokenize_windows(tokenizer, calib_text, calib_tokens, seq_len, "calib")
    n_val = max(1, math.ceil(validation_fraction * len(calib)))
    if len(calib) - n_val < 1:
        raise DataError(
            f"calibration needs at least 2 windows (fit + validation); got {len(calib)}: "
            f"use --calib-tokens >= {2 * seq_len}"
        )
    evaluation = None
    if eval_tokens:
        evaluation = tokenize_windows(tokenizer, eval_text, eval_tokens, seq_len, "eval")
        _check_disjoint(calib, evaluation)
    fit = calib[:-n_val]
    heal = None
    if heal_tokens is not None:
        heal = healing_windows(
            tokenizer, calib_text, fit, calib, heal_tokens, seq_len, at_most=heal_at_most
        )
        # The fit windows are checked against evaluation above; the text after them here.
        _check_disjoint(heal[len(fit) :], calib[-n_val:], "validation", "healing")
        if evaluation is not None:
            _check_disjoint(heal[len(fit) :], evaluation, "evaluation", "healing")
    return TokenWindows(
        fit=fit,
        validation=calib[-n_val:],
        eval=evaluation,
        seq_len=seq_len,
        source=source,
        calib_sha256=hash_tokens(calib),
        eval_sha256=None if evaluation is None else hash_tokens(evaluation),
        heal=heal,
    )


def healing_windows(tokenizer, calib_text, fit, calib, n_tokens, seq_len, *, at_most=False):
    """The first n_tokens // seq_len windows of: the fit windows, then the calibration half's
    windows after the calibration windows (the validation slice is skipped)."""
    import torch

    n_windows = n_tokens // seq_len
    if n_windows < 1:
        raise DataError(f"heal: {n_tokens} tokens is less than one window of seq_len={seq_len}")
    if n_windows <= len(fit):
        return fit if n_windows == len(fit) else fit[:n_windows]
    calib_ids = calib.numel()
    wanted = calib_ids + (n_windows - len(fit)) * seq_len
    ids = _tokenize_prefix(tokenizer, calib_text, wanted)
    if ids[:calib_ids] != calib.view(-1).tolist():  # a prefix tokenizes as the whole text
        raise DataError("the calibration half tokenizes differently when read further")
    tail = (len(ids[:wanted]) - calib_ids) // seq_len
    if tail < n_windows - len(fit) and not at_most:
        available = (len(fit) + tail) * seq_len
        raise DataError(
            f"the calibration half has {available} healing tokens (without the validation "
            f"windows), {n_tokens} asked for: use fewer --heal-tokens or a longer text"
        )
    rest = torch.tensor(ids[calib_ids : calib_ids + tail * seq_len], dtype=torch.long)
    return torch.cat([fit, rest.view(tail, seq_len)])


def hash_tokens(windows) -> str:
    return hashlib.sha256(windows.numpy().astype("<i8").tobytes()).hexdigest()


def _check_disjoint(calib, evaluation, judged="evaluation", judging="calibration") -> None:
    # The halves are disjoint by construction; also guard against repeated text producing
    # identical windows on both sides (which would leak evaluation into calibration).
    calib_hashes = {hash_tokens(w[None]) for w in calib}
    shared = sum(hash_tokens(w[None]) in calib_hashes for w in evaluation)
    if shared:
        raise DataError(f"{shared} {judged} window(s) also occur in {judging}; use other text")
