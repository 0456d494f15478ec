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
            "--calib-tokens",
            "8192",
            # 8 evaluation windows (4k tokens): the demo measures them three times (the
            # original, the model before healing, the reloaded checkpoint).
            "--eval-tokens",
            "4096",
            "--seq-len",
            "512",
            "--format",
            "standard",
            # The fit windows' size of healing text and 40 s of healing: the teacher's pass
            # over 64k tokens alone cost ~90 s of a 3-minute demo on 2 CPU cores. Replay swaps
            # half of the 16 windows for general text; the ~30 steps draw each about twice.
            "--heal-tokens",
            "8192",
            "--heal-seconds",
            "40",
            # 2 greedy continuations instead of 16: each costs ~1.3 s per model on 2 cores.
            "--generation-prompts",
            "2",
            "--output",
            str(output),
            "--report",
            str(output) + ".json",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
