"""Outside the calibration text: the general mixture, replay in healing, the top-k KL, and the
texts measured before and after (--eval-data, the mixture's held-out part as "general")."""

import gzip
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from api_schemas import CompressSpec, DataSpec
from linearize import mixture, pipeline, selfdata
from linearize.cli import main
from linearize.data import find_wikitext
from linearize.errors import DataError
from linearize.healing import topk_kl
from linearize.replay import mixed_windows
from linearize.selfdata import generated_windows
from linearize.texts import eval_texts

# bench/healbench.py's out-of-domain texts: the mixture must share no source with them.
EVALUATION_SOURCES = ("/usr/share/common-licenses", "/usr/share/doc/git/RelNotes")
STDLIB_EVALUATED = ("argparse", "textwrap", "shutil", "tarfile", "subprocess")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_model(
        "llama", tmp_path_factory.mktemp("models") / "llama", initializer_range=0.3
    )


@pytest.fixture
def planted_mixture(monkeypatch, tmp_path):
    """A built mixture in a fresh cache: two parts of distinct text."""
    monkeypatch.setenv("LINEARIZE_CACHE_DIR", str(tmp_path / "cache"))
    # Python sources of the interpreter the tests run on: fixed text that no edit of the
    # project's own files moves (none is a source the mixture or the evaluation texts use).
    import difflib
    import json as json_module

    directory = mixture.mixture_dir()
    directory.mkdir(parents=True)
    (directory / "heal.txt").write_text(Path(json_module.decoder.__file__).read_text() * 8)
    (directory / "heldout.txt").write_text(Path(difflib.__file__).read_text())
    return directory


def tiny_spec(model, **kw) -> CompressSpec:
    data = DataSpec(path=str(find_wikitext()))
    small = dict(layers=2, calib_tokens=2048, eval_tokens=1024, seq_len=128, generation_prompts=0)
    return CompressSpec(model=str(model), data=data, **small, **kw)


# --- the mixture ---------------------------------------------------------------------------------


def test_manifest_lists_every_source_with_version_licence_and_hashes():
    manifest = json.loads(mixture.MANIFEST_PATH.read_text())
    listed = {k["name"]: k for k in manifest["kinds"]}
    assert set(listed) == {k.name for k in mixture.KINDS}
    assert set(listed) >= {"encyclopaedic", "technical", "code", "dialogue", "math"}
    for kind in mixture.KINDS:
        entry = listed[kind.name]
        assert entry["package"] == kind.package and entry["licence"] == kind.licence
        assert entry["version"] and entry["paths"] == list(kind.paths)
        assert entry["heal_chars"] > 0 and entry["heldout_chars"] > 0
    debian = {p.split(":")[0] for k in mixture.KINDS for p in k.paths if ":" in p}
    debian |= {k.package for k in mixture.KINDS if not k.package.startswith("pypi:")}
    assert set(manifest["packages"]) == debian
    for part in mixture.PARTS:
        assert len(manifest["files"][part]["sha256"]) == 64 and manifest["files"][part]["bytes"]


def test_mixture_shares_no_source_with_the_evaluation_texts():
    for kind in mixture.KINDS:
        for path in kind.paths:
            assert not any(path.lstrip("/").startswith(s.lstrip("/")) for s in EVALUATION_SOURCES)
            assert not any(f"/{m}." in path or f"{m}.py" in path for m in STDLIB_EVALUATED)
            assert "wiki" not in path and "license" not in path.lower()


def _plant_sources(root: Path) -> dict:
    """Package roots holding files for every kind's globs (documents numbered in order)."""
    roots = {}
    for kind in mixture.KINDS:
        for pattern in kind.paths:
            package, _, glob = pattern.rpartition(":")
            base = root / (package or kind.package).replace(":", "_")
            roots[package or kind.package] = base
            path = base / glob.replace("*", "doc")
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind.split == "fortune" and not package:
                body = "\n%\n".join(f"{kind.name} quote {i}" for i in range(16))
            elif kind.split == "foldoc":
                body = "00-database-info\n\n" + "".join(
                    f"term{i}\n\n   {kind.name} entry {i}\n\n" for i in range(16)
                )
            else:
                body = f"{kind.name} file {path.name}\n"
            if path.suffix == ".dz":
                path.write_bytes(gzip.compress(body.encode()))
            else:
                path.write_text(body)
    return roots


def test_assemble_is_deterministic_holds_out_every_eighth_document_and_mixes_kinds(tmp_path):
    roots = _plant_sources(tmp_path)
    first = mixture.assemble(roots)
    assert first == mixture.assemble(roots)
    assert "00-database" not in first["heal"]  # the dictionary's header is no entry
    # 16 foldoc entries: the 8th and 16th are held out, the rest heal.
    assert "encyclopaedic entry 7\n" in first["heldout"]
    assert "encyclopaedic entry 15\n" in first["heldout"]
    assert "encyclopaedic entry 6\n" in first["heal"] and "entry 7\n" not in first["heal"]
    assert first["kinds"]["encyclopaedic"]["documents"] == 16
    for kind in mixture.KINDS:  # every kind in the first chunks of the healing part
        assert kind.name in first["heal"][: len(mixture.KINDS) * mixture.CHUNK_CHARS]


def test_an_unbuilt_mixture_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LINEARIZE_CACHE_DIR", str(tmp_path))
    assert not mixture.is_built()
    with pytest.raises(DataError, match="python -m linearize.mixture build"):
        mixture.part_path("heal")


# --- replay ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("share, expected", [(0.0, 0), (0.25, 10), (0.5, 20), (1.0, 40)])
def test_replay_draws_the_stated_share_of_windows(share, expected):
    own = torch.arange(40).repeat_interleave(8).view(40, 8)  # window i holds token i
    general = torch.full((50, 8), -1)
    mixed, n_general = mixed_windows(own, general, share)
    assert mixed.shape == own.shape and n_general == expected
    assert int((mixed[:, 0] == -1).sum()) == expected
    assert mixed[: 40 - expected, 0].tolist() == list(range(40 - expected))  # own text first


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_replay_share_outside_zero_one_is_refused(share):
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        mixed_windows(torch.zeros(4, 8), torch.zeros(4, 8), share)
    with pytest.raises(ValidationError, match=r"heal_mix is the share .* in \[0, 1\]"):
        CompressSpec(data=DataSpec(builtin="wikitext2"), layers=2, heal_mix=share)


# --- the top-k KL ---------------------------------------------------------------------------------


def test_topk_kl_equals_the_full_kl_when_k_is_the_vocabulary():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, 37, generator=generator, dtype=torch.float64)
    teacher = torch.randn(3, 5, 37, generator=generator, dtype=torch.float64)
    full = torch.nn.functional.kl_div(
        student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none"
    )
    expected = full.sum(-1).mean()
    assert topk_kl(student, teacher, 37).item() == pytest.approx(expected.item(), rel=1e-12)
    assert topk_kl(teacher, teacher, 5).item() == pytest.approx(0.0, abs=1e-12)


# --- texts measured before and after --------------------------------------------------------------


def test_empty_eval_text_and_unknown_gate_text_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    data = DataSpec(path=str(find_wikitext()))
    spec = CompressSpec(data=data, layers=2, eval_data={"code": str(empty)})
    with pytest.raises(DataError, match="contains no text"):
        eval_texts(spec, None, [])
    with pytest.raises(ValidationError, match="names the text 'chat', which is not measured"):
        CompressSpec(
            data=data, layers=2, eval_data={"code": "c.txt"}, gate_text_ppl_increase={"chat": 5}
        )
    with pytest.raises(ValidationError, match="'general', which is not"):
        CompressSpec(
            data=data, layers=2, eval_data={"x": "x"}, gate_text_ppl_increase={"general": 5}
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--eval-data", "code"], "--eval-data wants NAME=FILE"),
        (["--gate-ppl-increase", "code=much"], "--gate-ppl-increase wants P or NAME=P"),
        (["--gate-ppl-increase", "code=5"], "names the text 'code', which is not measured"),
        (["--heal-mix", "2"], "heal_mix is the share"),
        (["--map-shrink", "1.5"], "map_shrink"),
        (["--fit-mix", "-0.1"], "fit_mix"),
        (["--map-shrink", "0.5", "--method", "remove"], "method=remove fits none"),
    ],
)
def test_cli_refuses_bad_text_options_with_exit_2(argv, message, capsys, tmp_path):
    common = ["compress", "--model", "m", "--data", "wikitext2", "--layers", "2"]
    assert main([*common, "--output", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_compress_measures_the_general_text_replays_it_and_gates_on_it(
    tiny_llama, planted_mixture, tmp_path
):
    spec = tiny_spec(
        tiny_llama, heal_steps=10, heal_tokens=2048, gate_text_ppl_increase={"general": 0.0}
    )
    report = pipeline.run(spec, output_dir=tmp_path / "o")
    (general,) = report.eval_texts
    assert general.name == "general" and general.tokens == 1024
    assert general.increase_pct == pytest.approx(100 * (general.compressed / general.baseline - 1))
    replay = report.selection["healing"]["replay"]
    assert replay["share"] == 0.5 and replay["general_windows"] == 8 == replay["own_windows"]
    rule = next(r for r in report.gate.rules if r.name == "ppl_increase_pct:general")
    assert rule.value == general.increase_pct and rule.passed == (general.increase_pct <= 0)
    markdown = (tmp_path / "o" / "report.md").read_text()
    assert "## Outside the calibration text" in markdown and "| general |" in markdown
    saved = json.loads((tmp_path / "o" / "report.json").read_text())
    assert saved["eval_texts"][0]["compressed"] == general.compressed


def test_fit_mix_swaps_the_stated_share_of_fit_windows_and_keeps_validation(
    tiny_llama, planted_mixture, tmp_path
):
    """--fit-mix 0.25: a quarter of the fit windows (the last ones) are the mixture's first
    windows; the validation windows and the healing text stay the calibration text's; the
    analysis and the map are computed on the mixed windows (another calibration hash)."""
    from linearize.data import build_windows, load_source
    from linearize.loading import load_model
    from linearize.replay import general_windows, mix_fit

    spec = tiny_spec(tiny_llama, fit_mix=0.25, heal_steps=0)
    tokenizer = load_model(str(tiny_llama)).tokenizer
    windows = build_windows(
        tokenizer, load_source(spec.data), calib_tokens=2048, eval_tokens=1024, seq_len=128
    )
    own_fit, validation, calib_hash = windows.fit, windows.validation, windows.calib_sha256
    record = mix_fit(spec, tokenizer, windows)
    n = len(own_fit)  # 16 calibration windows: 12 fit, 4 validation; a quarter of 12 is 3
    assert n == 12 and len(windows.fit) == 12
    assert record == {"share": 0.25, "general_windows": 3, "own_windows": 9,
                      "source": record["source"]}  # fmt: skip
    assert torch.equal(windows.fit[:9], own_fit[:9])
    assert torch.equal(windows.fit[9:], general_windows(tokenizer, 3, 128))
    assert windows.validation is validation and windows.calib_sha256 != calib_hash
    report = pipeline.run(spec, output_dir=tmp_path / "o")
    assert report.selection["fit_mix"]["general_windows"] == 3
    assert report.data.calib_sha256 == windows.calib_sha256


def test_fit_mix_without_the_mixture_is_a_clear_error(tiny_llama, monkeypatch, tmp_path):
    monkeypatch.setenv("LINEARIZE_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(DataError, match="--fit-mix draws fit windows from the general text"):
        pipeline.run(tiny_spec(tiny_llama, fit_mix=0.5, heal_steps=0), output_dir=tmp_path / "o")


def test_auto_picks_the_method_that_measures_better_on_general_text(planted_mixture, tmp_path):
    # Layers 1 and 3 are exact identities (no attention or MLP output): the removal drops them
    # and changes nothing, while every window of two adjacent layers that the fit can replace
    # holds one layer that is not linear; on a random model the fit's error may lower or raise
    # the perplexity, so auto must measure rather than assume.
    model = AutoModelForCausalLM.from_pretrained(
        save_tiny_model("llama", tmp_path / "m0", initializer_range=0.3)
    )
    for i in (1, 3):
        layer = model.model.layers[i]
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    model.save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(tmp_path / "m0").save_pretrained(tmp_path / "m")
    spec = tiny_spec(tmp_path / "m", heal_steps=0)
    report = pipeline.run(spec, output_dir=tmp_path / "o")
    choice = report.selection["method_choice"]
    trials = choice["trials"]
    assert trials["remove"]["indices"] == [1, 3]  # the exact identities
    # Removing the identities changes nothing, so the evaluation increase is 0 if it was picked.
    fit, remove = (trials[m]["general_perplexity"] for m in ("fit", "remove"))
    assert abs(fit / remove - 1) > 0.01  # the two differ clearly on the general text
    picked = "fit" if fit < remove else "remove"
    assert choice["picked"] == picked
    assert report.method == {"fit": "fold-lstsq", "remove": "remove"}[picked]
    assert report.replaced_layers == trials[picked]["indices"]
    if picked == "remove":
        assert report.perplexity.increase_pct == pytest.approx(0.0, abs=1e-3)
    assert f"method auto picked {picked}" in " ".join(report.notes)


def test_a_map_shrink_that_is_neither_a_number_nor_auto_is_a_usage_error(capsys, tmp_path):
    argv = ["compress", "--model", "m", "--data", "wikitext2", "--layers", "2", "--output",
            str(tmp_path / "o"), "--map-shrink", "lots"]  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert "expected a number in [0, 1] or auto, got 'lots'" in capsys.readouterr().err


def test_map_shrink_auto_keeps_the_amount_that_measures_best_on_general_text(
    tiny_llama, planted_mixture, tmp_path
):
    """Every amount of the grid is tried on the general text's choice windows; the lowest
    perplexity wins, and the checkpoint is the one a fixed --map-shrink of that amount gives."""
    from linearize.auto import SHRINK_GRID

    report = pipeline.run(
        tiny_spec(tiny_llama, method="fit", map_shrink="auto", heal_steps=0),
        output_dir=tmp_path / "auto",
    )
    choice = report.selection["shrink_choice"]
    trials = {float(a): p for a, p in choice["trials"].items()}
    assert sorted(trials) == sorted(SHRINK_GRID) and len(set(trials.values())) == len(trials)
    assert choice["picked"] == min(trials, key=lambda a: (trials[a], a))
    assert f"map shrink auto picked {choice['picked']:g}" in " ".join(report.notes)
    fixed = pipeline.run(
        tiny_spec(tiny_llama, method="fit", map_shrink=choice["picked"], heal_steps=0),
        output_dir=tmp_path / "fixed",
    )
    assert report.replaced_layers == fixed.replaced_layers
    assert report.perplexity.compressed == fixed.perplexity.compressed


def test_map_shrink_auto_is_zero_with_a_note_where_it_cannot_choose(
    tiny_llama, tmp_path, monkeypatch
):
    monkeypatch.setenv("LINEARIZE_CACHE_DIR", str(tmp_path / "no-mixture"))
    spec = tiny_spec(tiny_llama, method="fit", map_shrink="auto", heal_steps=0)
    report = pipeline.run(spec, output_dir=tmp_path / "o")
    assert "shrink_choice" not in report.selection
    assert "map shrink auto is 0: the general text mixture is not built" in report.notes


def test_generated_windows_continue_their_prompts_to_full_windows(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_model("llama", tmp_path / "m"))
    fit = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator())
    windows, rate = generated_windows(model, fit, 3, 24, seed=1)
    assert windows.shape == (3, 24) and rate > 0
    prompts = fit[:, : selfdata.PROMPT_TOKENS]
    assert torch.equal(windows[:, : selfdata.PROMPT_TOKENS], prompts[[0, 1, 0]])
    assert torch.equal(windows, generated_windows(model, fit, 3, 24, seed=1)[0])


@pytest.mark.parametrize(
    "value, device, expected",
    [
        (None, "cpu", None),
        (None, "cuda", 4096),
        ("generated:512", "cpu", 512),
        ("calibration", "cuda", None),
    ],
)
def test_heal_text_defaults_to_generated_on_a_gpu_only(value, device, expected):
    assert selfdata.parse_heal_text(value, device, 4096) == expected


def test_mixture_rebuilds_offline_from_the_setup_packages_to_the_manifest_hashes(tmp_path):
    """make setup downloads the packages once; a build from them needs no network and gives
    the texts whose sha256 the committed manifest holds."""
    downloaded = Path.home() / ".cache" / "linearize" / "mixture" / "debs"
    if not any(downloaded.glob("*.deb")):
        pytest.skip("make setup has not downloaded the mixture's packages on this machine")
    (tmp_path / "debs").mkdir()
    for deb in downloaded.glob("*.deb"):
        (tmp_path / "debs" / deb.name).symlink_to(deb)
    built = mixture.build(tmp_path)
    committed = json.loads(mixture.MANIFEST_PATH.read_text())
    assert mixture.differences(built, committed) == []
    assert (tmp_path / "heal.txt").stat().st_size == committed["files"]["heal"]["bytes"]


def test_auto_that_picks_the_fit_reuses_its_trial_maps_instead_of_a_second_fit_pass(
    planted_mixture, tiny_llama, tmp_path, monkeypatch
):
    from linearize import auto as auto_module
    from linearize import fitting

    passes = []
    real_fit_pass = fitting.fit_pass

    def counted_fit_pass(*args, **kwargs):
        passes.append(args[2])  # the spans fitted
        return real_fit_pass(*args, **kwargs)

    def calibration_like_windows(tokenizer, spec):  # where the fit, fitted on it, measures better
        ids = tokenizer(find_wikitext().read_text()[:20000])["input_ids"][: 4 * spec.seq_len]
        return torch.tensor(ids).view(4, spec.seq_len)

    monkeypatch.setattr(fitting, "fit_pass", counted_fit_pass)
    monkeypatch.setattr(auto_module, "choice_windows", calibration_like_windows)
    auto = pipeline.run(tiny_spec(tiny_llama, heal_steps=0), output_dir=tmp_path / "auto")
    assert auto.selection["method_choice"]["picked"] == "fit"
    assert len(passes) == 1  # the trial's; the job's replacement took its maps
    passes.clear()
    fit = pipeline.run(tiny_spec(tiny_llama, heal_steps=0, method="fit"), output_dir=tmp_path / "f")
    assert len(passes) == 1
    assert auto.replaced_layers == fit.replaced_layers
    assert auto.perplexity.compressed == fit.perplexity.compressed  # the same maps, bit for bit
