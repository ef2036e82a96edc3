"""Recipes and the CLI: every bad input is one line on stderr and exit code 2."""

import subprocess
import sys
import textwrap

import pytest

from llmq.cli import main
from llmq.config import ModelConfig, RecipeError, parse_recipe
from llmq.evaluation import EvalConfig


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_recipe_values_cli_overrides_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMQ_TEST_FLAG", raising=False)
    recipe = write(
        tmp_path,
        """
        model_name_or_path: tiny-llama
        limit: 3
        temperature: 0.5
        use_peft: true
        lora_target_modules: [q_proj, v_proj]
        env:
          LLMQ_TEST_FLAG: enabled
    """,
    )
    model, evaluation = parse_recipe((ModelConfig, EvalConfig), [recipe, "--limit", "5"])
    assert model.model_name_or_path == "tiny-llama" and model.use_peft is True
    assert model.lora_target_modules == ["q_proj", "v_proj"]
    assert evaluation.limit == 5  # the command line wins over the file
    assert evaluation.temperature == 0.5 and evaluation.task == "gsm8k"
    assert model.trust_remote_code is False
    import os

    assert os.environ["LLMQ_TEST_FLAG"] == "enabled"


def test_every_shipped_recipe_parses_and_starts_with_its_command():
    from tests.conftest import REPO

    recipes = sorted((REPO / "recipes").rglob("*.yaml"))
    assert recipes
    for path in recipes:
        first_comment_block = path.read_text().split("\n\n")[0]
        assert "llmq " in first_comment_block and first_comment_block.startswith("#"), path
        command = next(line for line in first_comment_block.splitlines() if "llmq " in line)
        if " eval " in command:
            parse_recipe((ModelConfig, EvalConfig), [str(path)])
        else:
            from llmq.cli import train_config_types
            from llmq.config import load_recipe_file

            assert " train " in command, path
            parse_recipe(train_config_types(load_recipe_file(path).get("method", "shiq")), [str(path)])


@pytest.mark.parametrize(
    "content, message",
    [
        ("lmit: 3\n", "unknown key 'lmit'; did you mean 'limit'"),
        ("limit: three\n", "key 'limit': invalid int value: 'three'"),
        ("temperature: [1, 2]\n", "key 'temperature' takes one value, not a list"),
        ("model_name_or_path: no-such-model\n", "unknown model 'no-such-model'"),
        ("model_name_or_path: ./missing/dir\n", "unknown model './missing/dir'"),
        ("dtype: float8\n", "key 'dtype': invalid choice: 'float8'"),
        ("task: no-such-task\n", "unknown task 'no-such-task'"),
        ("limit: 0\n", "key 'limit' must be at least 1"),
        ("limit: [1\n", "not valid YAML at line"),
        ("- a\n- b\n", "a recipe must be a mapping"),
        ("env: [1, 2]\n", "'env' must map variable names"),
        ("num_samples: 4\n", "needs 'temperature' > 0"),
    ],
)
def test_bad_recipe_is_one_line_exit_2(tmp_path, capsys, content, message):
    recipe = write(tmp_path, content)
    code, out, err = run_cli(capsys, "eval", recipe)
    assert code == 2
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert recipe in err or "command line" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "missing.yaml"], "recipe file 'missing.yaml' does not exist"),
        (["eval", "--limt", "3"], "unknown option '--limt'; did you mean --limit"),
        (["eval", "--limit", "x"], "command line: key 'limit': invalid int value: 'x'"),
        (["eval", "--model_name_or_path", "nope"], "unknown model 'nope'"),
        (["frobnicate"], "unknown command 'frobnicate'"),
        (["models", "prepare", "nope"], "unknown model 'nope'; registered models:"),
        (["models", "delete"], "expected 'list' or 'prepare NAME'"),
    ],
)
def test_bad_command_line_is_one_line_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_recipe_error_names_the_file_for_dataclass_validation(tmp_path):
    recipe = write(tmp_path, "model_name_or_path: nowhere\n")
    with pytest.raises(RecipeError, match=f"{recipe}: key 'model_name_or_path': unknown model 'nowhere'"):
        parse_recipe((ModelConfig, EvalConfig), [recipe])


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    import dataclasses

    for config in (ModelConfig, EvalConfig):
        for field in dataclasses.fields(config):
            assert f"--{field.name}" in help_text, field.name
    assert "trust_remote_code" in help_text and "default: False" in " ".join(help_text.split())
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and all(c in out for c in ("train", "generate", "eval", "models"))


@pytest.mark.slow
def test_console_script_bad_input_has_no_traceback(tmp_path):
    recipe = write(tmp_path, "limit: many\n")
    result = subprocess.run(
        [sys.executable, "-m", "llmq.cli", "eval", recipe], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"llmq eval: error: {recipe}: key 'limit': invalid int value: 'many'"
    ]
