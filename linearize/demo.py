"""`make demo`: compress the bundled SmolLM2-135M by 4 layers on the shared wikitext.

Writes the checkpoint and its report to a fresh directory under ./out/ and prints the summary.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from linearize.data import WIKITEXT_ENV, WIKITEXT_RELATIVE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("..") / WIKITEXT_RELATIVE)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(
            f"demo: no text at {args.data}.\n"
            f"Put a UTF-8 text file there (the wikitext-2 raw test split, wiki.test.raw, is what "
            f"the numbers in BENCHMARKS.md use), or run `make demo DATA=/path/to/text.txt`, "
            f"or set {WIKITEXT_ENV}.",
            file=sys.stderr,
        )
        return 2
    output = args.out / time.strftime("demo-%Y%m%d-%H%M%S")
    from linearize.cli import main as cli_main

    return cli_main(
        [
            "compress",
            "--model",
            "smollm2-135m",
            "--layers",
            str(args.layers),
            "--data",
            str(args.data),
            # 12 calibration windows (the analysis and the fit read them) and 6 evaluation
            # windows, measured three times (the original, the model before healing, the
            # reloaded checkpoint), as is the general text of the same length: forward passes
            # are what the demo's time is made of on 2 CPU cores.
            "--calib-tokens",
            "6144",
            "--eval-tokens",
            "3072",
            "--seq-len",
            "512",
            "--format",
            "standard",
            # 8 windows of healing text and 30 s of healing: the teacher's pass over the
            # default 64k tokens alone would cost ~2 minutes of a 3-minute demo on 2 CPU
            # cores. Replay swaps half of the windows for general text; the ~30 steps draw
            # each window about four times.
            "--heal-tokens",
            "4096",
            "--heal-seconds",
            "30",
            # No greedy continuations: decoding reads every weight once per token (~100 ms a
            # step for this model on 2 cores, whatever the batch), so the check's 64 steps per
            # model cost ~13 s of a 3-minute demo; `linearize compress` runs it by default.
            "--generation-prompts",
            "0",
            "--output",
            str(output),
            "--report",
            str(output) + ".json",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
