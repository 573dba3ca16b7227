"""``lora-jax finetune --config run.yaml``: every setting from a file, flags on top, Hugging Face names, --print-config."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml
from cli_helpers import one_line_error, run_cli
from safetensors.numpy import load_file

from lora_jax.cli import build_parser, settings_from_args
from lora_jax.train import FinetuneSettings, read_chatterbot
from lora_jax.train.settings import flag_of, read_config_file_text
from lora_jax.train.tiny import save_tiny, texts_of, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("config")
    chats = read_chatterbot(strict=False)[::11][:120]
    rows = [{"prompt": c["messages"][0]["content"], "response": c["messages"][1]["content"]} for c in chats]
    tokenizer = tiny_tokenizer(texts_of(chats), vocab_size=320)
    model = save_tiny(root / "model", tiny_model(len(tokenizer), hidden_size=32), tokenizer)
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "model": model, "data": data}


def every_setting(assets, output):
    """A value for every field of FinetuneSettings (most of them not the default)."""
    return {
        "model": str(assets["model"]), "data": [str(assets["data"])], "output": str(output), "overwrite": False,
        "resume": False, "tiny": True, "progress": False, "samples": 1, "max_new_tokens": 3,
        "text_field": None, "prompt_field": "prompt", "response_field": "response", "messages_field": None,
        "split": None, "streaming": False, "shuffle_buffer": 50,
        "r": 2, "alpha": 6.0, "dropout": 0.1, "target_modules": "q_proj,k_proj,v_proj", "modules_to_save": None,
        "rslora": True, "init_adapter": None,
        "steps": 5, "epochs": None, "batch_size": 2, "grad_accum": 2, "seq_len": 48, "lr": 0.02, "warmup": 1,
        "schedule": "linear", "weight_decay": 0.01, "max_grad_norm": 0.5, "seed": 3, "packing": True, "buckets": 1,
        "dtype": "float32", "remat": "full", "eval_fraction": 0.1, "max_eval": 6, "max_examples": 100,
        "eval_every": 2, "save_every": 2, "keep": 2, "mesh": None, "sharding": "fsdp",
        "report_to": "tensorboard", "logging_steps": 2, "quantize": "int8", "double_quant": False,
        "chunked_loss": 16, "xla_cpu_scheduler": "memory", "use_dora": True, "trainable_token_indices": "1,2",
        "ensure_weight_tying": True, "loraplus_ratio": 4.0, "loraplus_lr_embedding": 1e-5,
    }


def as_flags(values):
    fields = {f.name: f for f in dataclasses.fields(FinetuneSettings)}
    argv = []
    for name, value in values.items():
        field = fields[name]
        flag = field.metadata["short"] or flag_of(field)
        if value is None or value is False and not flag.startswith("--no-"):
            continue
        if isinstance(value, bool):
            argv.append(flag)  # --tiny, --rslora, --packing; --no-progress for progress: false
        elif isinstance(value, list):
            argv += [flag, *value]
        else:
            argv += [flag, str(value)]
    return argv


def test_the_every_setting_table_covers_every_field(assets, tmp_path):
    assert set(every_setting(assets, tmp_path)) == {f.name for f in dataclasses.fields(FinetuneSettings)}


@pytest.mark.slow  # two runs with every setting
def test_a_config_with_every_setting_reproduces_the_flag_only_run_bitwise(assets, tmp_path, capsys):
    from_flags = every_setting(assets, tmp_path / "flags")
    code, _, err = run_cli(capsys, "finetune", *as_flags(from_flags))
    assert code == 0, err
    from_file = every_setting(assets, tmp_path / "file")
    (tmp_path / "every.yaml").write_text(yaml.safe_dump(from_file))
    code, _, err = run_cli(capsys, "finetune", "--config", tmp_path / "every.yaml")
    assert code == 0, err

    expected = load_file(str(tmp_path / "flags" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "file" / "adapter" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(expected) and any("k_proj" in k for k in got)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert json.loads((tmp_path / "file" / "run.json").read_text()) == \
        json.loads((tmp_path / "flags" / "run.json").read_text())
    # run.yaml holds every setting but the two that say what to do with --output.
    written = yaml.safe_load((tmp_path / "file" / "run.yaml").read_text())
    assert written == {k: v for k, v in from_file.items() if k not in ("resume", "overwrite")}


@pytest.mark.slow  # three runs
def test_the_written_run_yaml_resumes_and_repeats_the_run(assets, tmp_path, capsys):
    values = every_setting(assets, tmp_path / "first")
    values.update(report_to="none", samples=0, remat=None)
    (tmp_path / "start.yaml").write_text(yaml.safe_dump(values))
    assert run_cli(capsys, "finetune", "--config", tmp_path / "start.yaml")[0] == 0
    run_yaml = tmp_path / "first" / "run.yaml"
    code, _, err = run_cli(capsys, "finetune", "--config", run_yaml, "--resume")  # finished: nothing to redo
    assert code == 0, err
    code, _, err = run_cli(capsys, "finetune", "--config", run_yaml, "--output", tmp_path / "again")
    assert code == 0, err
    first = load_file(str(tmp_path / "first" / "adapter" / "adapter_model.safetensors"))
    again = load_file(str(tmp_path / "again" / "adapter" / "adapter_model.safetensors"))
    for key in first:
        np.testing.assert_array_equal(again[key], first[key], err_msg=key)
    code, _, err = run_cli(capsys, "finetune", "--config", run_yaml, "--resume", "--lr", "0.5")
    assert code == 2 and "lr: run 0.02, now 0.5" in one_line_error(err)


# -- flags over the file, --print-config ------------------------------------------------------------

def test_flags_override_the_file_and_print_config_shows_the_result(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("tiny: true\nlearning_rate: 0.5\nsteps: 3\nr: 16\n")
    code, out, err = run_cli(capsys, "finetune", "--config", config, "--lr", "0.01", "--output", tmp_path / "out",
                             "--print-config")
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert (shown["lr"], shown["steps"], shown["r"], shown["tiny"]) == (0.01, 3, 16, True)
    assert shown["batch_size"] == 4 and shown["model"] == "tiny"  # the rest: --tiny's defaults
    assert "resume" not in shown and "overwrite" not in shown
    assert not (tmp_path / "out").exists()  # nothing read or written
    assert FinetuneSettings(**read_config_file_text(out)) == \
        FinetuneSettings(tiny=True, lr=0.01, steps=3, r=16, output=str(tmp_path / "out")).resolved()


def test_print_config_with_resume_shows_the_runs_own_settings(tmp_path, capsys):
    output = tmp_path / "run"
    output.mkdir()
    (output / "run.json").write_text(json.dumps(FinetuneSettings(tiny=True, lr=0.02, steps=7).resolved().record()))
    code, out, _ = run_cli(capsys, "finetune", "--output", output, "--resume", "--print-config", "--keep", "5")
    assert code == 0
    shown = yaml.safe_load(out)
    assert (shown["lr"], shown["steps"], shown["keep"], shown["r"]) == (0.02, 7, 5, 4)


# -- Hugging Face names ----------------------------------------------------------------------------------

HF_FLAGS = [
    (["--learning-rate", "2e-4"], {"lr": 2e-4}), (["--max-steps", "200"], {"steps": 200}),
    (["--per-device-train-batch-size", "4"], {"batch_size": 4}),
    (["--gradient-accumulation-steps", "4"], {"grad_accum": 4}), (["--warmup-steps", "100"], {"warmup": 100}),
    (["--weight-decay", "0.01"], {"weight_decay": 0.01}), (["--max-grad-norm", "0.3"], {"max_grad_norm": 0.3}),
    (["--num-train-epochs", "3"], {"epochs": 3.0}), (["--seed", "42"], {"seed": 42}),
    (["--bf16"], {"dtype": "bfloat16"}), (["--logging-steps", "10"], {"logging_steps": 10}),
    (["--eval-steps", "50"], {"eval_every": 50}), (["--save-steps", "25"], {"save_every": 25}),
    (["--save-total-limit", "2"], {"keep": 2}), (["--lr-scheduler-type", "linear"], {"schedule": "linear"}),
    (["--gradient-checkpointing"], {"remat": "full"}), (["--report-to", "tensorboard"], {"report_to": "tensorboard"}),
]


@pytest.mark.parametrize("argv, expected", HF_FLAGS, ids=[a[0] for a, _ in HF_FLAGS])
def test_transformers_training_argument_names_are_flags_and_config_keys(tmp_path, argv, expected):
    from_flag = settings_from_args(build_parser().parse_args(["finetune", *argv]))
    assert from_flag == FinetuneSettings(**expected)
    key = argv[0][2:].replace("-", "_")
    value = yaml.safe_load(argv[1]) if len(argv) > 1 else True
    (tmp_path / "hf.yaml").write_text(yaml.safe_dump({key: value}))
    assert FinetuneSettings.from_config(tmp_path / "hf.yaml") == FinetuneSettings(**expected)


def test_epochs_set_the_steps_from_the_data(assets, tmp_path, capsys):
    code, _, err = run_cli(capsys, "finetune", "--tiny", "--model", assets["model"], "--data", assets["data"],
                           "--output", tmp_path / "run", "--num-train-epochs", "2", "--batch-size", "16",
                           "--no-progress", "--samples", "0", "--eval-every", "0")
    assert code == 0, err
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [s["epoch"] for s in steps if "loss" in s]
    assert len(epochs) == json.loads((tmp_path / "run" / "run.json").read_text())["steps"]
    assert epochs.count(0) == epochs.count(1) > 0 and set(epochs) == {0, 1}  # two whole passes


def test_epochs_need_a_known_epoch_length(tmp_path, capsys):
    code, _, err = run_cli(capsys, "finetune", "--tiny", "--streaming", "--num-train-epochs", "1",
                           "--output", tmp_path / "out")
    assert code == 2 and "give --steps instead" in one_line_error(err)


# -- bad files: one line naming the file and key ------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    ("learning_rat: 0.01\n", "unknown setting 'learning_rat' (did you mean 'learning_rate'?)"),
    ("max_step: 10\n", "unknown setting 'max_step' (did you mean 'max_steps'?)"),
    ("rank: 8\n", "unknown setting 'rank' (did you mean"),
    ("steps: many\n", "steps: expected an integer, got 'many' (a str)"),
    ("lr: [0.1]\n", "lr: expected a number, got [0.1] (a list)"),
    ("tiny: 'yes'\n", "tiny: expected true or false, got 'yes' (a str)"),
    ("data: 5\n", "data: expected a path or a list of paths, got 5"),
    ("lr: -0.01\n", "lr: expected a finite number > 0, got -0.01"),
    ("bf16: 1\n", "bf16: expected true or false"),
    ("lr: 0.1\nlearning_rate: 0.2\n", "lr and learning_rate both set lr; keep one"),
    ("r: 4\nr: 8\n", ":2: r is set twice"),
    ("- lr\n- 0.1\n", "expected a mapping of settings"),
    ("lr: [unclosed\n", "not valid YAML"),
])
def test_a_bad_config_file_is_one_line_naming_file_and_key(tmp_path, capsys, content, expected):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    code, _, err = run_cli(capsys, "finetune", "--config", config, "--output", tmp_path / "out")
    line = one_line_error(err)
    assert code == 2 and str(config) in line and expected in line, line
    assert not (tmp_path / "out").exists()


def test_a_config_file_runs_no_code(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    marker = tmp_path / "ran"
    config.write_text(f"lr: !!python/object/apply:os.system ['touch {marker}']\n")
    code, _, err = run_cli(capsys, "finetune", "--config", config)
    assert code == 2 and "not valid YAML" in one_line_error(err)
    assert not marker.exists()


def test_a_missing_config_file_is_named(tmp_path, capsys):
    code, _, err = run_cli(capsys, "finetune", "--config", tmp_path / "nope.yaml")
    assert code == 2 and "nope.yaml: no such config file (--config)" in one_line_error(err)


def test_a_switch_and_its_setting_together_are_refused(capsys):
    code, _, err = run_cli(capsys, "finetune", "--bf16", "--dtype", "float32")
    assert code == 2 and "--bf16 and --dtype both set dtype" in one_line_error(err)
