"""Fuzzing the recipe loader and the CLI's parsing: whatever a recipe file holds (random YAML
mappings of real and invented keys to values of any type, YAML that is not a mapping, text that
is not YAML, bytes that are not text), parsing ends in the dataclasses or in a one-line
RecipeError/UserError — never another exception; through `llmq` it is exit code 2 and one line."""

import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmq.cli import main, train_config_types
from llmq.config import ModelConfig, parse_recipe
from llmq.errors import UserError
from llmq.evaluation import EvalConfig, GenerateConfig

EVAL_KEYS = [
    "task",
    "split",
    "limit",
    "temperature",
    "num_samples",
    "decoding",
    "num_beams",
    "guide_model",
    "scorer",
    "max_new_tokens",
    "top_p",
    "seed",
    "dtype",
    "model_name_or_path",
    "compare_with",
    "env",
    "qvm_path",
    "search_budget",
    "search_lambda",
    "batch_size",
]
TRAIN_KEYS = [
    "method",
    "beta",
    "gamma",
    "loss_type",
    "learning_rate",
    "max_steps",
    "dataset_path",
    "build_task",
    "build_limit",
    "num_train_epochs",
    "per_device_train_batch_size",
    "train_games",
    "episode_steps",
    "critic_steps",
    "threshold",
    "label",
    "rollouts",
    "use_peft",
    "lora_r",
    "report_to",
    "build_temperature",
    "objective",
    "rounds",
    "replay_fraction",
    "buffer_capacity",
    "reward_funcs",
    "num_generations",
    "eval_limit",
    "build_num_completions",
    "sampling_temperature",
    "behaviour_temperature",
]
SAMPLING_KEYS = [
    "temperature",
    "top_p",
    "num_completions",
    "num_candidates",
    "num_beams",
    "decoding",
    "scorer",
    "seed",
    "min_score",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6,
)


def keys(known):
    return st.one_of(st.sampled_from(known), st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12))


def parse_or_refuse(types, path):
    """Either dataclasses, or a RecipeError/UserError whose message is one line."""
    try:
        return parse_recipe(types, [str(path)])
    except UserError as error:  # RecipeError is a UserError
        assert "\n" not in str(error).strip(), str(error)
        return None


FUZZ = settings(
    max_examples=int(__import__("os").environ.get("LLMQ_FUZZ_EXAMPLES", 60)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(recipe=st.dictionaries(keys(EVAL_KEYS), values, max_size=5))
def test_random_eval_recipes_parse_or_fail_in_one_line(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMQ_FUZZ", "1")  # an `env:` block may set variables: keep them in this test
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    parse_or_refuse((ModelConfig, EvalConfig), path)


@FUZZ
@given(
    recipe=st.dictionaries(keys(TRAIN_KEYS), values, max_size=5),
    method=st.sampled_from(["shiq", "dpo", "sft", "online", "grpo", "digiq", "qvm", "nonsense"]),
)
def test_random_train_recipes_parse_or_fail_in_one_line(recipe, method, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative output paths stay in the test folder
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    parse_or_refuse(train_config_types(method), path)


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10))


@FUZZ
@given(
    recipe=st.dictionaries(
        st.sampled_from(SAMPLING_KEYS),
        st.one_of(numbers, st.sampled_from(["sample", "greedy", "beam", "best_of_n", "verifier"])),
    )
)
def test_sampling_settings_are_valid_for_sampling_or_refused_in_one_line(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    for types in ((ModelConfig, GenerateConfig), (ModelConfig, EvalConfig)):
        parsed = parse_or_refuse(types, path)
        if parsed is not None:  # what is accepted must be something a sampler can do
            config = parsed[1]
            assert 0 <= config.temperature < float("inf") and 0 < config.top_p <= 1, config


@pytest.mark.parametrize(
    "argv, key",
    [
        (["eval", "--limit", "1", "--temperature", "-1"], "temperature"),
        (["eval", "--limit", "1", "--temperature", "nan"], "temperature"),
        (["eval", "--limit", "1", "--temperature", "0.7", "--top_p", "0"], "top_p"),
        (["generate", "--limit", "1", "--temperature", "-0.5"], "temperature"),
        (["train", "--method", "shiq", "--build_task", "gsm8k", "--build_temperature", "-1"], "temperature"),
        (["train", "--method", "qvm", "--sampling_temperature", "0"], "sampling_temperature"),
    ],
)
def test_a_sampling_setting_out_of_range_is_one_line_exit_2_before_any_model_loads(argv, key, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"'{key}'" in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    "command, key", [("generate", "dataset_path"), ("generate", "pairs_path"), ("eval", "output_dir")]
)
def test_an_output_location_that_cannot_be_written_is_refused_before_any_work(
    command, key, tmp_path, capsys, monkeypatch
):
    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the output location was checked")

    monkeypatch.setattr("llmq.cli.load_from_config", never)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main([command, "--limit", "1", f"--{key}", str(blocker / "inside")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"key '{key}'" in err and "is a file" in err and "\n" not in err


@FUZZ
@given(content=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_arbitrary_text_as_a_recipe_fails_in_one_line_or_parses(content, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(content, encoding="utf-8", errors="surrogateescape")
    parse_or_refuse((ModelConfig, EvalConfig), path)


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe\x00garbage",
        b"key: [unclosed",
        b"- a\n- b\n",
        b"!!python/object:os.system 'echo hi'\n",
        b"task: gsm8k\ntask: math500\n",
        b"limit: 1e999\n",
    ],
)
def test_malformed_recipes_through_the_cli_exit_2_with_one_line(content, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    code = main(["eval", str(path), "--limit", "0"])  # limit 0 is refused, so nothing ever runs
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("llmq eval: error:") and "\n" not in err and "Traceback" not in err
