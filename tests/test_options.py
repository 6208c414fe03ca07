"""Options declared once (fmd_tf.options): checks, command-line flags and ensemble settings
derived from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from fmd_tf import config as C
from fmd_tf.options import (
    NONE,
    OptionError,
    add_arguments,
    apply_arguments,
    check_value,
    cli_fields,
    given_arguments,
    member_shared_fields,
    normalize,
    option,
    validate,
)

CONFIGS = (C.DefenseConfig, C.ComboVAEConfig, C.ClassifierConfig, C.SplitConfig)
# What scripts/train.py listed by hand as MEMBER_SETTINGS before the options were declared once.
MEMBER_SETTINGS = ("num_morphs", "radius_step", "threshold_mode", "rho", "eta", "recon_fpr",
                   "recon_metric", "recon_pixel_tol", "selected_codes", "range_percentiles",
                   "purify_label", "suspicious")


def _parser():
    """Every config's flags on one parser, as a training script would add them."""
    p = argparse.ArgumentParser(prog="train")
    p.add_argument("--seed", type=int, default=0)  # the script's; DefenseConfig.seed: cli=False
    flags = add_arguments(p.add_argument_group("defense"), C.DefenseConfig)
    flags += add_arguments(p.add_argument_group("combo-VAE"), C.ComboVAEConfig)
    flags += add_arguments(p, C.ClassifierConfig, prefix="classifier_")
    flags += add_arguments(p, C.SplitConfig, prefix="split_")
    return p, flags


def _parse_error(parser, argv, capsys) -> str:
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    return capsys.readouterr().err


# ----------------------------------------------------------------------------- argparse


def test_one_flag_per_cli_field_without_clashes():
    parser, flags = _parser()  # argparse raises on a flag added twice
    assert len(flags) == len(set(flags))
    expected = sum(len(cli_fields(cls)) for cls in CONFIGS)
    assert len(flags) == expected
    defense = [f.name for f in dataclasses.fields(C.DefenseConfig)]
    assert cli_fields(C.DefenseConfig) == tuple(n for n in defense if n != "seed")
    assert "--recon-pixel-tol" in flags and "--classifier-batch-size" in flags
    assert "--split-train-size" in flags and "--batch-size" in flags
    args = parser.parse_args([])
    assert all(getattr(args, f[2:].replace("-", "_")) is None for f in flags)
    text = parser.format_help()  # help with '%' in it formats
    assert "--recon-metric {mae,mse,pixel_share}" in text
    assert "(must be in (0, 1); default: 0.15)" in " ".join(text.split())
    assert "85 % target" in " ".join(text.split())


def test_flags_parse_to_the_field_types():
    parser, _ = _parser()
    args = parser.parse_args([
        "--rho", "0.95", "--num-morphs", "8", "--range-percentiles", "2,98",
        "--selected-codes", "0,3", "--adaptive-budget", "true", "--recon-metric", "mse",
        "--dgmm-train-size", "none", "--classifier-epochs", "3", "--encoder-filters", "8, 16",
    ])
    assert args.rho == pytest.approx(0.95) and type(args.rho) is float
    assert args.num_morphs == 8 and type(args.num_morphs) is int
    assert args.range_percentiles == (2.0, 98.0)
    assert all(type(v) is float for v in args.range_percentiles)
    assert args.selected_codes == (0, 3)
    assert args.adaptive_budget is True
    assert args.recon_metric == "mse"
    assert args.dgmm_train_size is NONE  # given as none: differs from "not given" (None)
    assert args.classifier_epochs == 3 and args.encoder_filters == (8, 16)
    for text, expected in (("false", False), ("No", False), ("on", True), ("1", True)):
        assert parser.parse_args(["--adaptive-budget", text]).adaptive_budget is expected


@pytest.mark.parametrize("argv,message", [
    (["--recon-metric", "l2"], "invalid choice"),
    (["--num-morphs", "2.5"], "expected an int"),
    (["--rho", "high"], "expected a float"),
    (["--range-percentiles", "1"], "expected 2 comma-separated values"),
    (["--adaptive-budget", "maybe"], "expected true or false"),
    (["--seed-of-morphs", "1"], "unrecognized arguments"),
])
def test_flags_reject_values_that_do_not_parse(argv, message, capsys):
    parser, _ = _parser()
    err = _parse_error(parser, argv, capsys)
    assert message in err and (argv[0] in err or "unrecognized" in message)


def test_apply_arguments_overrides_only_given_flags():
    parser, _ = _parser()
    quick = C.quick_config(C.get_config("fmnist"))
    args = parser.parse_args(["--rho", "0.9", "--recon-metric", "pixel_share",
                              "--recon-pixel-tol", "0.1", "--vae-epochs", "2"])
    defense = apply_arguments(quick.defense, args)
    assert defense == dataclasses.replace(quick.defense, rho=0.9, recon_metric="pixel_share",
                                          recon_pixel_tol=0.1)
    assert defense.num_morphs == 8  # the quick config's, not the dataclass default
    combo = apply_arguments(quick.combo, args)
    assert combo == dataclasses.replace(quick.combo, vae_epochs=2)
    assert apply_arguments(quick.classifier, args, prefix="classifier_") is not None
    nothing = parser.parse_args([])
    assert apply_arguments(quick.defense, nothing) == quick.defense
    # "none" sets None; leaving the flag out keeps the config's value.
    assert quick.combo.dgmm_train_size == 512
    given = parser.parse_args(["--dgmm-train-size", "none"])
    assert given_arguments(given, C.ComboVAEConfig) == {"dgmm_train_size": None}
    assert apply_arguments(quick.combo, given).dgmm_train_size is None
    assert apply_arguments(C.DefenseConfig(selected_codes=(1, 2)),
                           parser.parse_args(["--selected-codes", "none"])).selected_codes is None


@pytest.mark.parametrize("argv,message", [
    (["--rho", "1.5"], r"^--rho: must be in \(0, 1\], got 1.5$"),
    (["--recon-pixel-tol", "1"], r"^--recon-pixel-tol: must be in \(0, 1\), got 1.0$"),
    (["--recon-fpr", "-0.1"], r"^--recon-fpr: must be in \[0, 1\)"),
    (["--num-morphs", "0"], r"^--num-morphs: must be >= 1, got 0$"),
    (["--num-morphs", "500"], r"^--num-morphs: .*= 400 candidates, fewer than num_morphs = 500"),
    (["--max-steps", "2"], r"^--max-steps: .*= 40 candidates, fewer than num_morphs = 100"),
    (["--range-percentiles", "99,1"], r"^--range-percentiles: must satisfy 0 <= low < high"),
    (["--selected-codes", "1,1"], r"^--selected-codes: must be distinct"),
])
def test_apply_arguments_names_the_flag_of_an_invalid_value(argv, message):
    parser, _ = _parser()
    with pytest.raises(ValueError, match=message):
        apply_arguments(C.DefenseConfig(), parser.parse_args(argv))


def test_apply_arguments_names_every_given_flag_of_a_cross_check():
    parser, _ = _parser()
    args = parser.parse_args(["--num-morphs", "90", "--max-steps", "4"])
    with pytest.raises(OptionError, match=r"^--num-morphs, --max-steps: .*= 80 candidates") as e:
        apply_arguments(C.DefenseConfig(), args)
    assert set(e.value.fields) == {"num_morphs", "candidates_per_step", "max_steps"}


def test_skip_and_instance_defaults():
    parser = argparse.ArgumentParser()
    flags = add_arguments(parser, C.DefenseConfig(num_morphs=8, max_steps=4,
                                                  candidates_per_step=4),
                          skip=("chunk_size", "adaptive_order"))
    assert "--chunk-size" not in flags and "--adaptive-order" not in flags
    assert "must be >= 1; default: 8)" in " ".join(parser.format_help().split())  # its value
    args = parser.parse_args(["--rho", "0.5"])
    assert apply_arguments(C.DefenseConfig(), args, skip=("chunk_size", "adaptive_order")).rho \
        == pytest.approx(0.5)
    with pytest.raises(TypeError, match="chunk_sise"):
        add_arguments(argparse.ArgumentParser(), C.DefenseConfig, skip=("chunk_sise",))


# ----------------------------------------------------------------------------- validate


@pytest.mark.parametrize("name,bad,good", [
    ("rho", [0.0, -0.1, 1.5, 1.0001], [1e-6, 0.95, 1.0]),
    ("recon_pixel_tol", [0.0, 1.0, -0.1, 1.2], [1e-3, 0.1, 0.999]),
    ("recon_fpr", [1.0, -0.01], [0.0, 0.0025, 0.99]),
    ("recon_metric", ["l2", "MAE", ""], ["mae", "mse", "pixel_share"]),
    ("eta", [-0.1, 1.1], [0.0, 0.9, 1.0]),
    ("adaptive_alpha", [0.0, 0.5], [0.01, 0.49]),
    ("num_morphs", [0, -1], [1, 400]),
    ("range_percentiles", [(50.0, 10.0), (-1.0, 99.0), (1.0, 100.5), (5.0, 5.0)],
     [(0.0, 100.0), (1.0, 99.0)]),
    ("selected_codes", [(), (1, 1), (-1, 2)], [None, (0,), (3, 1)]),
    ("threshold_mode", ["max"], ["per_code", "unified"]),
])
def test_validate_rejects_each_documented_bad_value(name, bad, good):
    for value in bad:
        cfg = dataclasses.replace(C.DefenseConfig(), **{name: value})
        with pytest.raises(OptionError, match=rf"^{name}: .*, got ") as e:
            validate(cfg)
        assert e.value.name == name
    for value in good:
        validate(dataclasses.replace(C.DefenseConfig(), **{name: value}))


def test_validate_cross_check_num_morphs_vs_search_candidates():
    validate(C.DefenseConfig(num_morphs=400))  # 20 candidates x 20 steps
    with pytest.raises(OptionError, match="candidates_per_step\\*max_steps = 400 candidates, "
                                          "fewer than num_morphs = 401"):
        validate(C.DefenseConfig(num_morphs=401))
    with pytest.raises(ValueError, match="fewer than num_morphs = 100"):
        validate(C.DefenseConfig(candidates_per_step=4, max_steps=24))
    validate(C.DefenseConfig(candidates_per_step=4, max_steps=25))


def test_validate_first_failing_field_and_other_configs():
    with pytest.raises(OptionError, match="^radius_step"):  # before rho in field order
        validate(C.DefenseConfig(radius_step=0.0, rho=2.0))
    with pytest.raises(OptionError, match="^dgmm_lr_schedule: must be one of cosine, constant"):
        validate(C.ComboVAEConfig(dgmm_lr_schedule="linear"))
    with pytest.raises(OptionError, match="^recon_weight: must be > 0"):
        validate(C.ComboVAEConfig(recon_weight=0.0))
    with pytest.raises(OptionError, match="^encoder_filters"):
        validate(C.ComboVAEConfig(encoder_filters=()))
    with pytest.raises(OptionError, match="^dropout"):
        validate(C.ClassifierConfig(dropout=1.0))
    with pytest.raises(OptionError, match="^val_size"):
        validate(C.SplitConfig(val_size=0))
    validate(C.ComboVAEConfig(dgmm_train_size=None, consistency_weight=0.0))


def test_shipped_configs_are_valid_and_unchanged():
    for name in ("fmnist", "mnist"):
        cfg = C.get_config(name)
        for part in (cfg.splits, cfg.classifier, cfg.combo, cfg.defense,
                     C.quick_config(cfg).defense, C.quick_config(cfg).combo):
            validate(part)
    quick = C.quick_config(C.get_config("fmnist"))
    assert (quick.defense.num_morphs, quick.defense.candidates_per_step, quick.defense.max_steps,
            quick.defense.chunk_size, quick.defense.rho) == (8, 4, 4, 256, 0.95)
    assert C.get_config("mnist").combo.shared_dim == 20
    d = C.DefenseConfig()
    assert (d.recon_metric, d.recon_pixel_tol, d.rho, d.purify_label, d.num_morphs) == (
        "mae", 0.15, 0.999, "corroborated", 100)
    assert C.to_dict(C.get_config("fmnist"))["defense"]["range_percentiles"] == (1.0, 99.0)


def test_normalize_converts_types_and_rejects_other_kinds():
    cfg = C.DefenseConfig(range_percentiles=[1, 99], selected_codes=[2, 0], rho=1,
                          num_morphs=8.0, max_steps=4, candidates_per_step=2)
    assert cfg.range_percentiles == (1.0, 99.0) and type(cfg.range_percentiles[0]) is float
    assert cfg.selected_codes == (2, 0) and type(cfg.rho) is float and type(cfg.num_morphs) is int
    hash(cfg)  # frozen, tuples only: hashable
    for kwargs, message in [(dict(num_morphs=2.5), "num_morphs: expected an int"),
                            (dict(num_morphs="8"), "num_morphs: expected an int"),
                            (dict(rho="0.9"), "rho: expected a float"),
                            (dict(range_percentiles=(1.0,)), "range_percentiles: expected 2"),
                            (dict(adaptive_budget="false"), "adaptive_budget: expected a bool"),
                            (dict(selected_codes=3), "selected_codes: expected a sequence")]:
        with pytest.raises(OptionError, match=message):
            C.DefenseConfig(**kwargs)
    assert C.SplitConfig(**{"train_size": 10, "val_size": 3, "cle_size": 4}).val_size == 3
    assert check_value(C.DefenseConfig, "recon_pixel_tol", 0.1) == pytest.approx(0.1)
    with pytest.raises(OptionError, match="recon_pixel_tol: must be in"):
        check_value(C.DefenseConfig, "recon_pixel_tol", 1.5)


def test_member_shared_fields_replace_the_hand_written_list():
    shared = member_shared_fields(C.DefenseConfig)
    added_since = ("margin_fpr",)  # declared member_shared with the option itself
    assert len(shared) == len(set(shared)) == len(MEMBER_SETTINGS) + len(added_since)
    assert set(shared) == set(MEMBER_SETTINGS) | set(added_since)
    assert member_shared_fields(C.ComboVAEConfig) == ()


def test_a_new_option_needs_only_its_declaration():
    @dataclass(frozen=True)
    class Toy:
        size: int = option(3, "how many", check=(lambda v: v >= 1, "must be >= 1"))
        mode: str = option("a", "which", choices=("a", "b"), member_shared=True)
        scale: float | None = option(None, "optional scale", check=(lambda v: v > 0,
                                                                    "must be > 0"))
        internal: int = option(0, "not a flag", cli=False)
        items: tuple[str, ...] = option(("x",), "names")

        def __post_init__(self):
            normalize(self)

    parser = argparse.ArgumentParser()
    assert add_arguments(parser, Toy) == ["--size", "--mode", "--scale", "--items"]
    args = parser.parse_args(["--size", "5", "--scale", "0.5", "--items", "p,q"])
    assert apply_arguments(Toy(), args) == Toy(size=5, scale=0.5, items=("p", "q"))
    assert member_shared_fields(Toy) == ("mode",)
    validate(Toy(scale=None))  # None skips the check of an optional field
    with pytest.raises(OptionError, match="^scale: must be > 0, got -1.0$"):
        validate(Toy(scale=-1))


# ----------------------------------------------------------------------------- constants


def test_choice_constants_agree_with_the_modules_that_use_them():
    from fmd_tf.defense import adaptive_budget, calibration, fm_defense, precision

    assert calibration.THRESHOLD_MODES == C.THRESHOLD_MODES
    assert adaptive_budget.DRAW_ORDERS == C.DRAW_ORDERS
    assert precision.COMPUTE_DTYPES == C.COMPUTE_DTYPES
    assert fm_defense.RECON_METRICS is C.RECON_METRICS
    assert fm_defense.PURIFY_LABELS is C.PURIFY_LABELS and fm_defense.PURIFY_ZU is C.PURIFY_ZU


_NO_TF = """
import sys, types
pkg = types.ModuleType("fmd_tf")
pkg.__path__ = [sys.argv[1]]  # the package without its __init__ (which loads the models)
sys.modules["fmd_tf"] = pkg
import fmd_tf.config, fmd_tf.options
fmd_tf.options.validate(fmd_tf.config.get_config("fmnist").defense)
heavy = sorted(m for m in ("tensorflow", "keras", "numpy") if m in sys.modules)
print(",".join(heavy) or "none")
"""


def test_config_and_options_import_without_tensorflow():
    import fmd_tf

    package = os.path.dirname(fmd_tf.__file__)
    out = subprocess.run([sys.executable, "-c", _NO_TF, package], check=True,
                         capture_output=True, text=True)
    assert out.stdout.strip() == "none"


@pytest.mark.parametrize("reader, key, good, bad", [
    (C.card_split_config, "splits", {"val_size": 20, "cle_size": 10}, {"val": 20}),
    (C.card_defense_config, "defense", {"rho": 0.9}, {"no_such_option": 1}),
])
def test_card_entries_read_or_name_the_card(tmp_path, reader, key, good, bad):
    import json

    assert reader(str(tmp_path)) is None
    card = tmp_path / "model_card.json"
    card.write_text(json.dumps({"hyperparameters": {}}))
    assert reader(str(tmp_path)) is None
    card.write_text(json.dumps({"hyperparameters": {key: good}}))
    read = reader(str(tmp_path))
    assert all(getattr(read, name) == value for name, value in good.items())
    card.write_text(json.dumps({"hyperparameters": {key: bad}}))
    with pytest.raises(ValueError, match=rf"model_card.json: cannot read .*hyperparameters\.{key}"):
        reader(str(tmp_path))


def test_card_preset_reads_the_last_runs_preset(tmp_path):
    import json

    assert C.card_preset(str(tmp_path)) is None
    (tmp_path / "model_card.json").write_text(json.dumps({"preset": "fast"}))
    assert C.card_preset(str(tmp_path)) == "fast"
    (tmp_path / "model_card.json").write_text("{")
    with pytest.raises(ValueError, match="not a JSON model card"):
        C.card_preset(str(tmp_path))


def test_card_classifier_training_reads_the_training_and_its_radius(tmp_path):
    import json

    card = tmp_path / "model_card.json"
    assert C.card_classifier_training(str(tmp_path)) is None
    for entry, expected in (({"training": "trades", "adversarial_eps": 0.2}, ("trades", 0.2)),
                            ({"training": "standard"}, ("standard", None))):
        card.write_text(json.dumps({"hyperparameters": {"classifier": entry}}))
        assert C.card_classifier_training(str(tmp_path)) == expected
    card.write_text(json.dumps({"hyperparameters": {"classifier": {"adversarial_eps": "wide"}}}))
    with pytest.raises(ValueError, match=r"model_card.json: cannot read .*classifier"):
        C.card_classifier_training(str(tmp_path))
