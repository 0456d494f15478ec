"""Windows are reproducible, disjoint, and bad data is a clear error."""

import json

import pytest
import torch
from tiny_models import build_tiny_tokenizer

from linearize.data import build_windows, read_text, split_halves, tokenize_windows
from linearize.errors import DataError

TEXT = "".join(f"Sentence number {i} talks about topic {i % 7}. " for i in range(3000))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_eval_windows_follow_the_documented_definition(tmp_path, tokenizer):
    source = read_text(write(tmp_path, "t.txt", TEXT))
    windows = build_windows(tokenizer, source, calib_tokens=1024, eval_tokens=512, seq_len=128)
    _, second_half = split_halves(TEXT)
    expected = tokenizer(second_half)["input_ids"][:512]
    assert windows.eval.shape == (4, 128)
    assert windows.eval.reshape(-1).tolist() == expected


def test_calibration_splits_into_fit_and_validation(tmp_path, tokenizer):
    source = read_text(write(tmp_path, "t.txt", TEXT))
    windows = build_windows(
        tokenizer,
        source,
        calib_tokens=1024,
        eval_tokens=None,
        seq_len=128,
        validation_fraction=0.25,
    )
    assert windows.fit.shape == (6, 128) and windows.validation.shape == (2, 128)
    first_half, _ = split_halves(TEXT)
    assert windows.calibration.reshape(-1).tolist() == tokenizer(first_half)["input_ids"][:1024]


def test_repeated_text_leaking_into_eval_is_refused(tmp_path, tokenizer):
    source = read_text(write(tmp_path, "t.txt", "abcd" * 4000))
    with pytest.raises(DataError, match="also occur in calibration"):
        build_windows(tokenizer, source, calib_tokens=256, eval_tokens=256, seq_len=64)


def test_too_little_text_says_how_many_tokens_are_needed(tmp_path, tokenizer):
    source = read_text(write(tmp_path, "t.txt", "short text " * 20))
    with pytest.raises(DataError, match=r"only \d+ tokens, 4096 needed"):
        build_windows(tokenizer, source, calib_tokens=4096, eval_tokens=None, seq_len=64)


def test_fewer_tokens_than_a_window_is_refused(tokenizer):
    with pytest.raises(DataError, match="less than one window"):
        tokenize_windows(tokenizer, TEXT, 100, 128, "calib")


def test_missing_empty_and_non_utf8_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_text(tmp_path / "absent.txt")
    with pytest.raises(DataError, match="no text"):
        read_text(write(tmp_path, "empty.txt", "  \n"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_text(write(tmp_path, "latin1.txt", "caf\xe9".encode("latin-1")))


def test_jsonl_reads_the_text_field_and_reports_bad_lines(tmp_path):
    rows = [{"text": "first"}, {"text": "second"}]
    path = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    assert read_text(path).text == "first\n\nsecond"
    bad = write(tmp_path, "bad.jsonl", '{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_text(bad)


def test_token_hashes_identify_the_windows(tmp_path, tokenizer):
    source = read_text(write(tmp_path, "t.txt", TEXT))
    a = build_windows(tokenizer, source, calib_tokens=512, eval_tokens=512, seq_len=128)
    b = build_windows(tokenizer, source, calib_tokens=512, eval_tokens=512, seq_len=128)
    assert a.calib_sha256 == b.calib_sha256 and a.eval_sha256 == b.eval_sha256
    assert a.calib_sha256 != a.eval_sha256
    assert torch.equal(a.eval, b.eval)


def test_crlf_newlines_read_like_python_text_mode(tmp_path):
    path = write(tmp_path, "crlf.txt", b"first line\r\nsecond line\r\n")
    with open(path) as handle:
        assert read_text(path).text == handle.read() == "first line\nsecond line\n"


def healing(tmp_path, tokenizer, heal_tokens, **kw):
    source = read_text(write(tmp_path, "t.txt", TEXT))
    return build_windows(
        tokenizer,
        source,
        calib_tokens=1024,
        eval_tokens=512,
        seq_len=128,
        heal_tokens=heal_tokens,
        **kw,
    )


def test_healing_windows_are_the_fit_windows_then_the_text_after_calibration(tmp_path, tokenizer):
    windows = healing(tmp_path, tokenizer, heal_tokens=2048)
    first_half, _ = split_halves(TEXT)
    ids = tokenizer(first_half)["input_ids"]
    assert windows.heal.shape == (16, 128)
    assert torch.equal(windows.heal[:6], windows.fit)
    assert windows.heal[6:].reshape(-1).tolist() == ids[1024 : 1024 + 10 * 128]
    # Nothing the healing reads is a validation or evaluation window.
    held_out = {tuple(w.tolist()) for w in torch.cat([windows.validation, windows.eval])}
    assert not held_out & {tuple(w.tolist()) for w in windows.heal}
    # The analysis windows are those of a run without healing text.
    plain = healing(tmp_path, tokenizer, heal_tokens=None)
    assert plain.heal is plain.fit
    assert windows.calib_sha256 == plain.calib_sha256
    assert torch.equal(windows.fit, plain.fit)


def test_fewer_healing_tokens_than_the_fit_windows_heal_on_their_first_windows(tmp_path, tokenizer):
    plain = healing(tmp_path, tokenizer, None)
    assert torch.equal(healing(tmp_path, tokenizer, 256).heal, plain.fit[:2])
    six = healing(tmp_path, tokenizer, 6 * 128)
    assert six.heal is six.fit


def test_more_healing_tokens_than_the_half_has_is_an_error_unless_at_most(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"has \d+ healing tokens .*10000000 asked for"):
        healing(tmp_path, tokenizer, heal_tokens=10**7)
    everything = healing(tmp_path, tokenizer, heal_tokens=10**7, heal_at_most=True)
    first_half, _ = split_halves(TEXT)
    n_half = len(tokenizer(first_half)["input_ids"])
    assert len(everything.heal) == 6 + (n_half - 1024) // 128


def test_healing_text_repeating_a_validation_window_is_refused(tmp_path, tokenizer):
    source = read_text(write(tmp_path, "t.txt", "abcd" * 8000))
    with pytest.raises(DataError, match="validation window"):
        build_windows(
            tokenizer, source, calib_tokens=256, eval_tokens=None, seq_len=64, heal_tokens=1024
        )
