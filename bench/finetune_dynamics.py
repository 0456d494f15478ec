"""Does fine-tuning make the bundled model more linear? Fine-tune, then `linearize compare`.

The bundled SmolLM2-135M-Instruct is the only pretrained model available offline, so it is
compared with its own fine-tune (never with itself). The narrow text is one wikitext-2 (test)
article from the second half of the file, "American Beauty ( 1999 film )": outside the
calibration windows that `compare` measures on (the first calibration tokens of the first
half) and outside the general-text evaluation windows used below (the start of the second half).
Its last `--heldout-windows` windows are held out to measure in-domain perplexity.

Steps: full fine-tune (all parameters, AdamW) for a bounded number of steps of 1 x seq_len
tokens cycling over the article's windows -> perplexity before/after on the held-out article end
and on general wikitext -> save the fine-tune (fp32, linearize.checkpoint) -> run the CLI
`linearize compare --model smollm2-135m --model <fine-tune> --data wikitext2 ...` end to end.

    .venv/bin/python bench/finetune_dynamics.py                  # ~10 min on 2 CPU cores

Writes bench/results/finetune_dynamics.json and bench/results/finetune_compare/ (compare.md,
compare.png, report.json); the fine-tuned checkpoint goes to --workdir (outside the repo).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("bench.finetune_dynamics")

ARTICLE = " = American Beauty ( 1999 film ) = \n"


def article_text(text: str, title_line: str = ARTICLE) -> str:
    """One wikitext article: from its title line to the next top-level title."""
    start = text.index(title_line, len(text) // 2)
    end = start + len(title_line)
    while True:
        end = text.find("\n = ", end)
        if end < 0 or text[end + 4 : end + 5] != "=":  # " = Title = " (not " = = Section")
            break
        end += 1
    return text[start : None if end < 0 else end]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--heldout-windows", type=int, default=4)
    parser.add_argument("--general-windows", type=int, default=4, help="wikitext eval windows")
    parser.add_argument("--calib-tokens", type=int, default=8192, help="for compare")
    parser.add_argument("--max-minutes", type=float, default=10.0, help="stop training early")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/linearize-finetune"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)

    from linearize.checkpoint import save_checkpoint
    from linearize.data import find_wikitext, split_halves, tokenize_windows
    from linearize.evaluation import evaluate_perplexity
    from linearize.loading import load_model
    from linearize.training import train

    path = find_wikitext()
    text = path.read_text(encoding="utf-8")
    article = article_text(text)
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer(article, add_special_tokens=False)["input_ids"]
    n = len(ids) // args.seq_len
    windows = torch.tensor(ids[: n * args.seq_len]).view(n, args.seq_len)
    train_windows, heldout = windows[: -args.heldout_windows], windows[-args.heldout_windows :]
    general = tokenize_windows(
        tokenizer,
        split_halves(text)[1],
        args.general_windows * 512,
        512,
        "eval",
    )
    log.info(
        "article: %d chars, %d tokens -> %d train windows x %d, %d held out",
        len(article),
        len(ids),
        len(train_windows),
        args.seq_len,
        len(heldout),
    )
    before = {
        "article_heldout_ppl": evaluate_perplexity(model, heldout),
        "wikitext_general_ppl": evaluate_perplexity(model, general),
    }
    log.info("before: %s", before)

    deadline = time.monotonic() + 60 * args.max_minutes
    stopped: dict = {}

    def on_step(record) -> None:
        if record.step % 10 == 0 or record.step == 1:
            log.info("step %d loss %.4f", record.step, record.lm_loss)
        if time.monotonic() > deadline and not stopped:
            stopped["at"] = record.step
            raise TimeoutError

    batches = [w[None] for w in train_windows]
    start = time.perf_counter()
    history: list = []  # filled step by step, so an early stop keeps what was done

    def record(step_log) -> None:
        history.append(step_log)
        on_step(step_log)

    try:
        train(model, batches, args.steps, args.lr, on_step=record)
    except TimeoutError:
        log.warning("time limit: stopped after %d steps", stopped["at"])
    train_seconds = time.perf_counter() - start
    model.eval()
    after = {
        "article_heldout_ppl": evaluate_perplexity(model, heldout),
        "wikitext_general_ppl": evaluate_perplexity(model, general),
    }
    log.info("after: %s", after)
    ft_dir = args.workdir / "smollm2-135m-american-beauty"
    save_checkpoint(
        model,
        tokenizer,
        ft_dir,
        resolved_spec={
            "finetune": {
                "base": args.model,
                "text": f"{path.name}: article {ARTICLE.strip()!r}",
                "steps": len(history),
                "seq_len": args.seq_len,
                "lr": args.lr,
                "optimizer": "AdamW, all parameters, grad clip 1.0",
            }
        },
        force=True,
    )
    del model, loaded, tokenizer
    gc.collect()

    compare_dir = args.out / "finetune_compare"
    report_path = compare_dir / "report.json"
    command = [
        sys.executable,
        "-m",
        "linearize",
        "compare",
        "--model",
        args.model,
        "--model",
        str(ft_dir),
        "--data",
        "wikitext2",
        "--calib-tokens",
        str(args.calib_tokens),
        "--seq-len",
        "512",
        "--report",
        str(report_path),
        "--output",
        str(compare_dir),
        "--quiet",
    ]
    log.info("running: %s", " ".join(command))
    start_compare = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    compare_seconds = time.perf_counter() - start_compare
    print(result.stdout)
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        raise SystemExit(f"linearize compare failed with exit code {result.returncode}")
    report = json.loads(report_path.read_text())
    base, tuned = report["compare"]
    summary = {
        "text": f"{path}: article {ARTICLE.strip()!r} ({len(article)} chars, {len(ids)} tokens)",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "steps_done": len(history),
        "train_seconds": round(train_seconds, 1),
        "train_loss_first_last": [history[0].lm_loss, history[-1].lm_loss] if history else None,
        "perplexity_before": before,
        "perplexity_after": after,
        "compare_command": " ".join(command[1:]),
        "compare_seconds": round(compare_seconds, 1),
        "base_summary": base["summary"],
        "finetune_summary": tuned["summary"],
        "per_layer_score_difference": [d["score"] for d in tuned["differences"]],
        "per_layer_score_without_residual_difference": [
            d["score_without_residual"] for d in tuned["differences"]
        ],
    }
    (args.out / "finetune_dynamics.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in list(summary)[3:8]}, indent=2))
    print(f"wrote {args.out / 'finetune_dynamics.json'} and {compare_dir}")


if __name__ == "__main__":
    main()
