"""Independent perplexity check: plain transformers + torch, no linearize code.

Re-derives the evaluation windows from their published definition (second half of the text by
characters, tokenized with the checkpoint's tokenizer and default special tokens, first N tokens,
non-overlapping windows, labels = inputs) and prints the perplexity, to compare with a report's
`perplexity.reloaded`.

    python bench/independent_ppl.py CHECKPOINT_DIR TEXT_FILE --eval-tokens 8192 --seq-len 512
"""

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("text", type=Path)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    with open(args.text, encoding="utf-8") as handle:  # text mode: newlines become LF
        text = handle.read()
    second_half = text[len(text) // 2 :]
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    ids = tokenizer(second_half)["input_ids"][: args.eval_tokens]
    n = len(ids) // args.seq_len
    windows = torch.tensor(ids[: n * args.seq_len]).view(n, args.seq_len)

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    total_nll, predicted = 0.0, 0
    with torch.no_grad():
        for window in windows:
            out = model(input_ids=window[None], labels=window[None])
            total_nll += out.loss.item() * (args.seq_len - 1)  # loss is the mean over S-1 tokens
            predicted += args.seq_len - 1
    ppl = math.exp(total_nll / predicted)
    layers = model.config.num_hidden_layers
    report = args.checkpoint / "report.json"
    reloaded = json.loads(report.read_text())["perplexity"]["reloaded"] if report.exists() else None
    print(f"layers {layers}  independent perplexity {ppl:.4f}  report reloaded {reloaded}")
    if reloaded:
        print(f"relative difference {100 * (ppl / reloaded - 1):+.3f}%")


if __name__ == "__main__":
    main()
