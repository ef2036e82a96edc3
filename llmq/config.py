"""Recipes and command lines → validated config dataclasses, in the style of TRL's ``TrlParser``.

A recipe is one flat YAML mapping whose keys are the fields of the command's dataclasses (all of
them share one namespace), plus an optional ``env:`` block exported to the environment.
``--key value`` flags on the command line override the file, which overrides the defaults.

Unlike ``TrlParser`` (which sets YAML values as argparse defaults, unchecked), every YAML value
goes through the same argparse type conversion as a command-line flag, so a wrong type in the file
is caught and reported with the key and the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trl
import yaml
from transformers import HfArgumentParser

from llmq.errors import UserError
from llmq.models import EMBEDDED_MODEL, check_model_reference


class RecipeError(UserError):
    """A recipe or command-line override is malformed; the message names the key and the file."""


@dataclasses.dataclass
class ModelConfig(trl.ModelConfig):
    """TRL's model/PEFT arguments with llmq's defaults: the embedded model, ``dtype: auto``, and
    ``trust_remote_code`` off unless a recipe turns it on."""

    model_name_or_path: str = dataclasses.field(
        default=EMBEDDED_MODEL,
        metadata={
            "help": "Registered model name (see `llmq models list`), local directory, or Hugging Face Hub id. "
            f"Default: {EMBEDDED_MODEL}."
        },
    )
    dtype: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "Weights dtype: auto (bf16 on a CUDA GPU, fp32 on CPU), float32, bfloat16 or float16.",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    trust_remote_code: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Run model code shipped with a Hub repository. Off by default; only turn it on for repositories "
            "you trust."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            check_model_reference(self.model_name_or_path)
        except UserError as error:
            raise RecipeError(f"key 'model_name_or_path': {error}") from None


class _Parser(HfArgumentParser):
    """``HfArgumentParser`` whose argparse errors become :class:`RecipeError` instead of usage + exit."""

    def error(self, message: str):  # type: ignore[override]
        raise RecipeError(message)


def make_parser(dataclass_types: Sequence[type], prog: str, description: str) -> _Parser:
    """The parser behind ``llmq <command> --help``: one option per dataclass field, with its help text."""
    parser = _Parser(
        list(dataclass_types),
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        # A field defined by two dataclasses (TRL's DPOConfig and ModelConfig both have
        # trust_remote_code) becomes one option whose value both receive.
        conflict_handler="resolve",
    )
    parser.add_argument(
        "recipe", nargs="?", help="YAML recipe; its keys are the options below, and flags given here override it"
    )
    return parser


def _option_strings(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.option_strings}


def _to_argv(key: str, value: Any, action: argparse.Action) -> list[str]:
    """Spell one YAML entry as the command-line flag that sets it."""
    flag = f"--{key}"
    if isinstance(value, bool):
        return [flag, str(value).lower()]
    if isinstance(value, list):
        if action.nargs not in ("+", "*"):
            raise RecipeError(f"key '{key}' takes one value, not a list")
        return [flag, *(json.dumps(item) if isinstance(item, dict) else str(item) for item in value)]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    return [flag, str(value)]


def load_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a recipe into a flat dict; raise :class:`RecipeError` naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' does not exist")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())  # one line, whatever YAML says
        raise RecipeError(f"{path}: not valid YAML{where}: {problem}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys to values, not {type(content).__name__}")
    return content


def _export_env(block: Any, source: str) -> None:
    def valid_name(name: Any) -> bool:
        return isinstance(name, str) and bool(name) and "=" not in name and "\0" not in name

    if not isinstance(block, dict) or not all(
        valid_name(k) and isinstance(v, (str, int, float, bool)) and "\0" not in str(v) for k, v in block.items()
    ):
        raise RecipeError(f"{source}: 'env' must map variable names (non-empty, without '=') to strings or numbers")
    for name, value in block.items():
        os.environ[str(name)] = str(value)


def parse_recipe(
    dataclass_types: Sequence[type],
    argv: Sequence[str],
    prog: str = "llmq",
    description: str = "",
) -> tuple[Any, ...]:
    """Parse ``[RECIPE] [--key value ...]`` into instances of ``dataclass_types``.

    Raises :class:`RecipeError` for an unknown key, a wrong type, a missing file, or a value the
    dataclasses reject, with a message that names the key and where it came from.
    """
    parser = make_parser(dataclass_types, prog, description)
    argv = list(argv)
    recipe_path = argv.pop(0) if argv and not argv[0].startswith("-") else None
    options = _option_strings(parser)
    # Which keys may be null: their field's annotation admits None (annotations are strings here).
    nullable = {
        f.name: any(word in str(f.type) for word in ("None", "Optional", "Any")) or f.default is None
        for t in dataclass_types
        for f in dataclasses.fields(t)
    }

    recipe_argv: list[str] = []
    source = "command line"
    if recipe_path is not None:
        source = recipe_path
        content = load_recipe_file(recipe_path)
        if "env" in content:
            _export_env(content.pop("env"), recipe_path)
        for key, value in content.items():
            if key not in options:
                close = difflib.get_close_matches(str(key), options, n=3)
                hint = (
                    f"; did you mean {', '.join(repr(c) for c in close)}?"
                    if close
                    else f"; see `{prog} --help` for the allowed keys"
                )
                raise RecipeError(f"{recipe_path}: unknown key '{key}'{hint}")
            if value is None:
                if not nullable.get(key, True):
                    raise RecipeError(f"{recipe_path}: key '{key}' needs a value (the recipe gives null)")
                parser.set_defaults(**{key: None})
                continue
            try:
                recipe_argv += _to_argv(key, value, options[key])
            except RecipeError as error:
                raise RecipeError(f"{recipe_path}: {error}") from None
        try:
            parser.parse_known_args(recipe_argv)
        except RecipeError as error:
            raise RecipeError(f"{recipe_path}: {_rephrase(str(error))}") from None

    try:
        namespace, unknown = parser.parse_known_args(recipe_argv + argv)
    except RecipeError as error:
        raise RecipeError(f"command line: {_rephrase(str(error))}") from None
    if unknown:
        flag = next((item for item in unknown if item.startswith("-")), unknown[0])
        close = difflib.get_close_matches(flag.lstrip("-"), options, n=3)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else f"; see `{prog} --help`"
        raise RecipeError(f"command line: unknown option '{flag}'{hint}")

    values = vars(namespace)
    instances = []
    for dataclass_type in dataclass_types:
        names = {f.name for f in dataclasses.fields(dataclass_type) if f.init}
        try:
            instances.append(dataclass_type(**{k: v for k, v in values.items() if k in names}))
        except UserError as error:
            raise RecipeError(f"{source}: {error}") from None
        except (ValueError, TypeError) as error:
            message = " ".join(str(error).split())
            raise RecipeError(f"{source}: invalid {dataclass_type.__name__}: {message}") from None
    return tuple(instances)


def _rephrase(message: str) -> str:
    """argparse says 'argument --lr: invalid float value' — say 'key lr: ...' so it reads for YAML too."""
    if message.startswith("argument --"):
        key, _, rest = message[len("argument --") :].partition(": ")
        return f"key '{key.split('/')[0]}': {rest}"
    return message


def check_output_path(path: str | os.PathLike, key: str) -> None:
    """Raise :class:`UserError` naming ``key`` unless a file or folder can be written at ``path``:
    checked before any work starts, so that hours of generation are never lost to a bad path."""
    location = Path(path).absolute()
    existing = next(folder for folder in (location, *location.parents) if folder.exists())
    if existing == location and not location.is_dir():
        raise UserError(f"key '{key}': '{path}' exists and is not a folder")
    if not existing.is_dir():
        raise UserError(f"key '{key}': '{path}' cannot be created: '{existing}' is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"key '{key}': '{path}' is not writable ({error.strerror or error}: {existing})") from None


def mirror(config_type: type, name: str, **metadata: str) -> dataclasses.Field:
    """A field with the default and help of ``config_type``'s field ``name``, for a recipe key that
    sets that field of another config (``build_temperature`` → ``GenerateConfig.temperature``):
    one source for the default, so the two never drift apart."""
    source = next(field for field in dataclasses.fields(config_type) if field.name == name)
    return dataclasses.field(default=source.default, metadata={**source.metadata, **metadata})
