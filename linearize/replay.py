"""Replay: a share of the healing windows comes from the general text mixture; `--fit-mix`
does the same for the fit windows.

Healing on the calibration text alone overwrites what that text never shows; swapping a share
of its windows for general text kept more of the model elsewhere (METHODS.md, "Replay in
healing"). The healing windows stay one LongTensor (n, seq_len) of token ids, the same count as
without replay: the calibration windows first (the fit windows lead them), then the mixture's,
which replace the calibration text's last windows.
"""

from __future__ import annotations

from linearize.errors import DataError

DEFAULT_HEAL_MIX = 0.5  # BENCHMARKS.md, "How does it do out of domain?"


def mixed_windows(own, general, share: float):
    """(windows, n_general): len(own) windows, the last round(share * n) of them general."""
    import torch

    if not 0.0 <= share <= 1.0:
        raise DataError(f"the replay share must be in [0, 1]; got {share}")
    n_general = round(share * len(own))
    if n_general > len(general):
        raise DataError(
            f"replay wants {n_general} windows of general text, the mixture gave {len(general)}"
        )
    if n_general == 0:
        return own, 0
    return torch.cat([own[: len(own) - n_general], general[:n_general]]), n_general


def general_windows(tokenizer, n_windows: int, seq_len: int, part: str = "heal"):
    """The first n_windows windows of one part of the built mixture, tokenized like any text."""
    from linearize.data import read_text, tokenize_windows
    from linearize.mixture import part_path

    text = read_text(part_path(part)).text
    return tokenize_windows(tokenizer, text, n_windows * seq_len, seq_len, "general mixture")


def replay_share(spec, notes: list[str]) -> float:
    """The spec's heal_mix, else the default when the mixture is built (else 0, with a note)."""
    from linearize.mixture import is_built

    if spec.heal_mix is not None:
        return spec.heal_mix
    if is_built():
        return DEFAULT_HEAL_MIX
    notes.append(
        "healing used the calibration text alone: the general text mixture is not built "
        "(`python -m linearize.mixture build`, which make setup runs)"
    )
    return 0.0


def replay(spec, tokenizer, windows, notes: list[str]) -> dict | None:
    """Mix the general text into windows.heal (in place); the report's record of it."""
    share = replay_share(spec, notes)
    if share == 0 or windows.heal is None:
        return None
    n_general = round(share * len(windows.heal))
    general = general_windows(tokenizer, max(1, n_general), windows.seq_len)
    windows.heal, n_general = mixed_windows(windows.heal, general, share)
    return {
        "share": share,
        "general_windows": n_general,
        "own_windows": len(windows.heal) - n_general,
        "source": "the general text mixture's healing part (linearize.mixture)",
    }


def mix_fit(spec, tokenizer, windows) -> dict | None:
    """--fit-mix: swap a share of the fit windows for the mixture's (in place), so that the
    analysis and the fitted map see general text too; the validation windows, which judge the
    result in domain, stay the user's. The calibration hash follows the windows, so that no
    cached analysis of the other windows is taken for this one."""
    import torch

    from linearize.data import hash_tokens
    from linearize.mixture import is_built

    if not spec.fit_mix:
        return None
    if not is_built():
        raise DataError(
            "--fit-mix draws fit windows from the general text mixture, which is not built: "
            "python -m linearize.mixture build (make setup runs it)"
        )
    n_general = round(spec.fit_mix * len(windows.fit))
    general = general_windows(tokenizer, max(1, n_general), windows.seq_len)
    windows.fit, n_general = mixed_windows(windows.fit, general, spec.fit_mix)
    windows.calib_sha256 = hash_tokens(torch.cat([windows.fit, windows.validation]))
    return {
        "share": spec.fit_mix,
        "general_windows": n_general,
        "own_windows": len(windows.fit) - n_general,
        "source": "the general text mixture's healing part (linearize.mixture)",
    }
