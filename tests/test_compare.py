"""`compare`: one analysis per model over the same windows, with per-layer differences."""

from __future__ import annotations

import json
import random

import pytest
from tiny_models import build_tiny_tokenizer, save_tiny_model

from api_schemas import CompareSpec, DataSpec
from linearize import pipeline
from linearize.compare import check_same_windows, summary_lines
from linearize.data import build_windows, read_text
from linearize.errors import InputError


def _text(path):
    rng = random.Random(0)
    words = [
        "the",
        "a",
        "of",
        "linear",
        "layer",
        "model",
        "token",
        "residual",
        "stream",
        "norm",
        "block",
        "map",
        "fit",
        "score",
    ]
    path.write_text(" ".join(rng.choice(words) for _ in range(1500)))
    return path


def _spec(models, data):
    return CompareSpec(
        models=[str(m) for m in models],
        data=DataSpec(path=str(data)),
        calib_tokens=512,
        seq_len=64,
    )


def _byte_tokenizer(swap: tuple[str, str] | None = None, unk: str = "<unk>"):
    """The tiny byte tokenizer, optionally with two byte ids swapped or the unk token renamed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    if swap:
        vocab[swap[0]], vocab[swap[1]] = vocab[swap[1]], vocab[swap[0]]
    for i, special in enumerate(["<s>", "</s>", "<pad>", unk]):
        vocab[special] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token=unk
    )


def test_compare_tiny_models_writes_table_plot_and_exact_zero_self_difference(tmp_path):
    a = save_tiny_model("llama", tmp_path / "a", seed=0)
    b = save_tiny_model("llama", tmp_path / "b", seed=1)
    data = _text(tmp_path / "text.txt")
    out = tmp_path / "out"
    report = pipeline.run(_spec([a, b, a], data), output_dir=out, report_path=tmp_path / "r.json")

    assert report.kind == "compare" and report.model.source == str(a)
    assert [e["model"] for e in report.compare] == [str(a), str(b), str(a)]
    assert [r.index for r in report.linearity] == list(range(6))
    first, other, same = report.compare
    assert "differences" not in first and len(other["differences"]) == 6
    # the same model over the same windows: bit-identical analysis, zero differences
    for row in same["differences"]:
        assert row["score"] == 0 and row["score_without_residual"] == 0 and row["anisotropy"] == 0
    assert same["summary"]["relative_change_one_minus_score"] == 0
    assert any(abs(r["score"]) > 0 for r in other["differences"])
    for r, mine, ref in zip(other["differences"], other["layers"], first["layers"], strict=True):
        assert r["anisotropy"] == pytest.approx(mine["anisotropy"] - ref["anisotropy"])

    assert {"compare.md", "compare.png", "report.json"} <= {p.name for p in out.iterdir()}
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "compare.md").read_text()
    assert "M1 - M0" in markdown and "## score w/o residual" in markdown
    assert json.loads((tmp_path / "r.json").read_text())["compare"][1]["model"] == str(b)
    lines = summary_lines(report)
    assert len(lines) == 3 and "layers more linear" in lines[1]


def test_compare_refuses_a_model_with_a_different_tokenizer(tmp_path):
    a = save_tiny_model("llama", tmp_path / "a", seed=0)
    c = save_tiny_model("llama", tmp_path / "c", seed=0)
    _byte_tokenizer(swap=("e", "t")).save_pretrained(c)
    data = _text(tmp_path / "text.txt")
    with pytest.raises(InputError, match="tokenizer differs"):
        pipeline.run(_spec([a, c], data))


def test_check_same_windows_accepts_a_different_vocab_with_identical_ids(tmp_path):
    source = read_text(_text(tmp_path / "text.txt"))
    base = build_tiny_tokenizer()
    windows = build_windows(base, source, calib_tokens=256, eval_tokens=None, seq_len=64)
    notes: list[str] = []
    check_same_windows(base, _byte_tokenizer(unk="<oov>"), windows, "renamed", notes)
    assert notes and "identical ids" in notes[0]
    with pytest.raises(InputError):
        check_same_windows(base, _byte_tokenizer(swap=("e", "t")), windows, "swapped", [])
