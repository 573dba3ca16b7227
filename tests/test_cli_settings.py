"""Every finetune setting is checked before anything is read or written; one table drives the CLI.

A refused run leaves the output directory as it was (it does not even exist
afterwards), so the corrected command runs without --overwrite.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from cli_helpers import chat_assets, one_line_error, run_cli

from lora_jax.cli import build_parser
from lora_jax.train import FinetuneSettings, SettingsError
from lora_jax.train.settings import flag_of, read_run_file


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return chat_assets(tmp_path_factory.mktemp("settings"))


# Each bad value, and the flag its one-line error must name. The data and model do not exist:
# the error names the flag, so the value was checked before anything was read.
BAD_ARGUMENTS = [
    (["--steps", "0"], "--steps"), (["--batch-size", "0"], "--batch-size"), (["--keep", "0"], "--keep"),
    (["--buckets", "0"], "--buckets"), (["--remat", "bogus"], "--remat"), (["--save-every", "0"], "--save-every"),
    (["--mesh", "0"], "--mesh"), (["--mesh", "2x0"], "--mesh"), (["--mesh", "two"], "--mesh"),
    (["--seq-len", "0"], "--seq-len"), (["--seq-len", "1"], "--seq-len"), (["--max-examples", "-1"], "--max-examples"),
    (["--max-examples", "0"], "--max-examples"), (["--grad-accum", "0"], "--grad-accum"),
    (["--sharding", "bogus"], "--sharding"), (["--lr", "-0.01"], "--lr"), (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--max-grad-norm", "nan"], "--max-grad-norm"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--weight-decay", "inf"], "--weight-decay"), (["--dropout", "1.5"], "--dropout"), (["--dropout", "1"], "--dropout"),
    (["--dropout", "-0.1"], "--dropout"), (["--eval-fraction", "2"], "--eval-fraction"),
    (["--eval-fraction", "1"], "--eval-fraction"), (["--eval-fraction", "nan"], "--eval-fraction"),
    (["--alpha", "nan"], "--alpha"), (["--alpha", "0"], "--alpha"), (["--alpha", "-16"], "--alpha"),
    (["-r", "0"], "-r"), (["-r", "-4"], "-r"), (["--warmup", "-1"], "--warmup"), (["--seed", "-1"], "--seed"),
    (["--seed", str(2**40)], "--seed"), (["--max-eval", "-1"], "--max-eval"), (["--eval-every", "-1"], "--eval-every"),
    (["--samples", "-1"], "--samples"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--target-modules", ""], "--target-modules"), (["--target-modules", " , "], "--target-modules"),
    (["--target-modules", "/[unclosed/"], "--target-modules"), (["--modules-to-save", "/(/"], "--modules-to-save"),
    (["--schedule", "step"], "--schedule"), (["--dtype", "float16"], "--dtype"), (["--steps", "1.5"], "--steps"),
    (["--lr", "fast"], "--lr"), (["--resume", "--overwrite"], "--resume"),
]


@pytest.mark.parametrize("bad, flag", BAD_ARGUMENTS, ids=[" ".join(b) for b, _ in BAD_ARGUMENTS])
def test_bad_argument_is_refused_naming_its_flag_before_anything_is_read(tmp_path, capsys, bad, flag):
    output = tmp_path / "out"
    code, _, err = run_cli(capsys, "finetune", "--model", tmp_path / "no-model", "--data", tmp_path / "no-data.jsonl",
                           "--output", output, *bad)
    line = one_line_error(err)
    assert code == 2
    assert flag in line and "no-data" not in line and "no-model" not in line, line
    assert not output.exists()


def test_the_same_values_are_refused_from_python():
    for values, flag in [({"lr": -0.01}, "--lr"), ({"steps": 0}, "--steps"), ({"dropout": float("nan")}, "--dropout"),
                         ({"r": True}, "-r"), ({"batch_size": 2.0}, "--batch-size"), ({"data": []}, "--data"),
                         ({"tiny": "yes"}, "--tiny"), ({"output": ""}, "--output")]:
        with pytest.raises(SettingsError, match=flag):
            FinetuneSettings(**values)


def test_a_mesh_larger_than_the_machine_is_refused_before_reading(tmp_path, capsys):
    import jax

    devices = jax.device_count()
    code, _, err = run_cli(capsys, "finetune", "--tiny", "--data", tmp_path / "no-data.jsonl", "--output",
                           tmp_path / "out", "--mesh", str(devices + 1))
    assert code == 2 and f"--mesh {devices + 1}: needs {devices + 1} devices" in one_line_error(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad, expected", [
    (["-r", "100000"], "-r 100000"),
    (["--target-modules", "no_such_proj"], "no_such_proj' matches no module"),
    (["--target-modules", "/^nothing$/"], "matches no module"),
    (["--modules-to-save", "no_such_head"], "no_such_head' matches no module"),
])
def test_lora_settings_that_do_not_fit_the_model_are_refused_before_writing(tmp_path, assets, capsys, bad, expected):
    output = tmp_path / "out"
    code, _, err = run_cli(capsys, "finetune", "--tiny", "--data", assets["data"], "--output", output,
                           "--no-progress", *bad)
    line = one_line_error(err)
    assert code == 2 and expected in line and "does not fit the model" in line, line
    assert not output.exists()  # no run.json, no base_model/


def test_the_corrected_run_needs_no_overwrite(tmp_path, assets, capsys):
    output = tmp_path / "out"
    code, _, err = run_cli(capsys, "finetune", "--tiny", "--data", assets["data"], "--output", output, "-r", "100000")
    assert code == 2 and "Rank 100000" in one_line_error(err)
    code, _, err = run_cli(capsys, "finetune", "--tiny", "--data", assets["data"], "--output", output, "-r", "2",
                           "--steps", "2", "--samples", "0", "--no-progress")
    assert code == 0, err
    assert json.loads((output / "run.json").read_text())["r"] == 2


def test_a_missing_init_adapter_is_refused_before_reading(tmp_path, capsys):
    code, _, err = run_cli(capsys, "finetune", "--tiny", "--data", tmp_path / "no-data.jsonl", "--output",
                           tmp_path / "out", "--init-adapter", tmp_path / "no-adapter")
    line = one_line_error(err)
    assert code == 2 and "no-adapter" in line and "--init-adapter" in line
    assert not (tmp_path / "out").exists()


# -- run.json ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "expected a JSON object of settings, found a list"),
    ('{"r": "eight"}', "-r: expected an integer >= 1, got 'eight'"),
    ('{"lr": "0.01"}', "--lr: expected a finite number > 0, got '0.01'"),
    ('{"tiny": "yes"}', "--tiny: expected true or false"),
    ('{"data": 5}', "--data: expected one or more paths"),
])
def test_a_bad_run_json_is_one_line_naming_the_file(tmp_path, capsys, content, expected):
    output = tmp_path / "run"
    output.mkdir()
    (output / "run.json").write_text(content)
    code, _, err = run_cli(capsys, "finetune", "--output", output, "--resume")
    line = one_line_error(err)
    assert code == 2 and "run.json" in line and expected in line, line


def test_resume_without_a_run_says_so(tmp_path, capsys):
    code, _, err = run_cli(capsys, "finetune", "--output", tmp_path / "none", "--resume")
    assert code == 2 and "Nothing to resume" in one_line_error(err)
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "finetune", "--output", tmp_path / "empty", "--resume")
    assert code == 2 and "no run.json" in one_line_error(err)


def test_run_json_keeps_the_keys_older_runs_wrote():
    record = FinetuneSettings(tiny=True).resolved().record()
    assert set(record) == {
        "model", "data", "tiny", "r", "alpha", "dropout", "target_modules", "modules_to_save", "rslora", "steps",
        "batch_size", "grad_accum", "seq_len", "lr", "warmup", "schedule", "weight_decay", "max_grad_norm", "seed",
        "packing", "buckets", "dtype", "remat", "eval_fraction", "max_eval", "max_examples", "eval_every",
        "save_every", "keep", "init_adapter"}
    assert record["data"] == "chatterbot-corpus/english" and record["model"] == "tiny"


def test_a_resumed_run_keeps_its_settings_and_refuses_a_changed_one(tmp_path):
    saved = FinetuneSettings(tiny=True, steps=7, lr=0.02, save_every=2).resolved().record()
    (tmp_path / "run.json").write_text(json.dumps(saved))
    read = read_run_file(tmp_path / "run.json")
    resumed = FinetuneSettings(resume=True, keep=5).resolved(read)
    assert (resumed.steps, resumed.lr, resumed.save_every, resumed.keep, resumed.r) == (7, 0.02, 2, 5, 4)
    assert resumed.trajectory_changes(read) == []  # keep decides nothing about the adapter
    changed = FinetuneSettings(resume=True, lr=0.5, alpha=8).resolved(read)
    assert changed.trajectory_changes(read) == ["lr: run 0.02, now 0.5"]  # alpha 8 (an int) is the run's 8.0


# -- one table: flags, defaults and help ----------------------------------------------------------

def test_every_setting_is_a_flag_with_the_tables_default_and_help():
    parser = build_parser()
    finetune = parser._subparsers._group_actions[0].choices["finetune"]
    actions = {action.dest: action for action in finetune._actions}
    defaults = vars(parser.parse_args(["finetune"]))
    for field in dataclasses.fields(FinetuneSettings):
        action = actions[field.name]
        assert flag_of(field) in action.option_strings
        assert defaults[field.name] == field.default  # None: the table's default, or the resumed run's
        assert field.metadata["help"] in action.help
        if field.metadata["kind"] is not bool and field.metadata["default"] is not None:
            assert f"default {field.metadata['default']}" in action.help
    assert "4 with --tiny" in actions["r"].help and "-r" in actions["r"].option_strings


def test_flags_build_the_same_settings_as_python(assets, tmp_path):
    args = build_parser().parse_args(["finetune", "--tiny", "--data", str(assets["data"]), "--lr", "0.01",
                                      "-r", "2", "--no-progress", "--output", str(tmp_path)])
    from lora_jax.cli import settings_from_args

    from_flags = settings_from_args(args).resolved()
    from_python = FinetuneSettings(tiny=True, data=[assets["data"]], lr=0.01, r=2, progress=False,
                                   output=str(tmp_path)).resolved()
    assert from_flags == from_python
    config = from_python.train_config()
    assert (config.learning_rate, config.max_steps, config.seq_len) == (0.01, 30, 64)
    assert from_python.lora_config().r == 2 and from_python.lora_config().lora_alpha == 8.0


@pytest.mark.parametrize("argv, flag", [
    (["generate", "--temperature", "-1", "hi"], "--temperature"), (["generate", "--temperature", "nan", "hi"], "--temperature"),
    (["generate", "--top-p", "0", "hi"], "--top-p"), (["generate", "--top-p", "1.5", "hi"], "--top-p"),
    (["generate", "--max-new-tokens", "0", "hi"], "--max-new-tokens"), (["generate", "--seed", "-3", "hi"], "--seed"),
    (["info", "-r", "0"], "-r"), (["info", "--alpha", "inf"], "--alpha"), (["export", "run", "--output", "x", "--step", "-1"],
                                                                        "--step"),
])
def test_the_other_commands_check_their_values_too(capsys, argv, flag):
    code, _, err = run_cli(capsys, *argv)
    line = one_line_error(err)
    assert code == 2 and f"argument {flag}" in line and "expected" in line, line
