"""Trainer checkpoints: which one a run resumes from, and whether its files read back.

The ``transformers.Trainer`` writes ``output_dir/checkpoint-N`` in order: weights, optimizer,
scheduler, RNG states, and ``trainer_state.json`` last.  A process killed while saving leaves a
folder without that file (or with a truncated one): such a folder is incomplete and never resumed
from.  A complete folder whose weights do not read back (a disk that filled up, a copy that was cut
short) is an error that names the file, so a resume never ends in a traceback halfway through
loading.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llmq.errors import UserError

TRAINER_STATE = "trainer_state.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _step(folder: Path) -> int | None:
    match = _CHECKPOINT.match(folder.name)
    return int(match.group(1)) if match else None


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether the checkpoint folder's ``trainer_state.json`` (written last) exists and parses."""
    try:
        json.loads(Path(folder, TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return True


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir`` whose ``trainer_state.json`` parses, newest (largest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    folders = [folder for folder in root.iterdir() if folder.is_dir() and _step(folder) is not None]
    return sorted((folder for folder in folders if is_complete(folder)), key=_step, reverse=True)


def _what_to_do(folder: Path) -> str:
    """The advice ending a checkpoint error: delete the folder, resume from the previous complete one."""
    step = _step(folder)
    previous = [other for other in complete_checkpoints(folder.parent) if step is not None and _step(other) < step]
    if previous:
        return f"delete {folder} and resume from {previous[0]}"
    return f"delete {folder} and train from the start"


def _read_safetensors(file: Path, names: set[str] | None = None) -> None:
    """Read every tensor of ``file`` (safetensors checks the header against the file's size), and check it holds
    ``names``."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
            for key in keys:
                handle.get_tensor(key)
    except (OSError, SafetensorError) as error:
        raise UserError(f"{file} is truncated or corrupt ({error}); {_what_to_do(file.parent)}") from None
    if names is not None and not names <= keys:
        raise UserError(
            f"{file} lacks {len(names - keys)} tensor(s) that {WEIGHTS_INDEX} places in it, e.g. "
            f"'{min(names - keys)}'; {_what_to_do(file.parent)}"
        )


def _weights(folder: Path) -> dict[Path, set[str] | None]:
    """The safetensors files holding a checkpoint's weights, each with the tensor names its index expects (None:
    any)."""
    files: dict[Path, set[str] | None] = {}
    for name in (WEIGHTS, ADAPTER_WEIGHTS):
        if (folder / name).is_file():
            files[folder / name] = None
    if (folder / WEIGHTS_INDEX).is_file():
        try:
            weight_map = json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(
                f"{folder / WEIGHTS_INDEX} is not a safetensors index ({type(error).__name__}: {error}); "
                f"{_what_to_do(folder)}"
            ) from None
        for tensor, shard in weight_map.items():
            files.setdefault(folder / shard, set()).add(tensor)
    for file in files:
        if not file.is_file():
            raise UserError(f"{file}, named by {WEIGHTS_INDEX}, is missing; {_what_to_do(folder)}")
    return files


def _check_deepspeed(step_folder: Path) -> None:
    """Every ``*.pt`` of a DeepSpeed ``global_step*`` folder is a complete torch zip archive with intact CRCs."""
    for file in sorted(step_folder.glob("*.pt")):
        try:
            with zipfile.ZipFile(file) as archive:
                damaged = archive.testzip()
        except (OSError, zipfile.BadZipFile) as error:
            raise UserError(f"{file} is truncated or corrupt ({error}); {_what_to_do(step_folder.parent)}") from None
        if damaged is not None:
            raise UserError(
                f"{file} is corrupt (its entry '{damaged}' fails its checksum); {_what_to_do(step_folder.parent)}"
            )


def validate_checkpoint(path: str | os.PathLike) -> Path:
    """Raise :class:`UserError` unless ``path`` is a complete checkpoint whose weights read back; return it.

    Weights are ``model.safetensors``, shards listed by ``model.safetensors.index.json``, a PEFT
    ``adapter_model.safetensors``, or (DeepSpeed) the torch archives of a ``global_step*`` folder.
    Every tensor is read, which catches truncated files and damaged headers (safetensors stores no
    checksum, so a flipped bit inside a tensor's data goes unnoticed).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"checkpoint {folder} does not exist or is not a directory")
    if not (folder / TRAINER_STATE).is_file():
        raise UserError(
            f"checkpoint {folder} is incomplete: it has no {TRAINER_STATE}, which the Trainer writes last (its save "
            f"was interrupted); {_what_to_do(folder)}"
        )
    if not is_complete(folder):
        raise UserError(
            f"checkpoint {folder} is incomplete: its {TRAINER_STATE} is not valid JSON (its save was interrupted); "
            f"{_what_to_do(folder)}"
        )
    weights = _weights(folder)
    # The Trainer's DeepSpeed folders are global_step*, accelerate's save_state (method online) pytorch_model.
    deepspeed = sorted(child for child in [*folder.glob("global_step*"), folder / "pytorch_model"] if child.is_dir())
    if not weights and not deepspeed:
        raise UserError(
            f"checkpoint {folder} has no weights ({WEIGHTS}, {WEIGHTS_INDEX}, {ADAPTER_WEIGHTS} or a DeepSpeed "
            f"global_step folder); {_what_to_do(folder)}"
        )
    for file, names in weights.items():
        _read_safetensors(file, names)
    for step_folder in deepspeed:
        _check_deepspeed(step_folder)
    return folder


def resume_point(output_dir: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint-N`` under ``output_dir``, validated; None when there is none.

    Incomplete folders (no parseable ``trainer_state.json``: the process died while saving) are
    skipped; a complete one whose weights are damaged raises :class:`UserError`.
    """
    complete = complete_checkpoints(output_dir)
    return str(validate_checkpoint(complete[0])) if complete else None


def save_partitioned_weights(
    model: torch.nn.Module, output_dir: str | os.PathLike, *, write: bool, max_shard_bytes: int = 512 * 2**20
) -> list[str]:
    """Write a ZeRO-3-partitioned model's weights as transformers reads them (``model.safetensors``, or shards of at
    most ``max_shard_bytes`` — one larger tensor alone — listed by ``model.safetensors.index.json``) without any
    process holding them all.

    Every process calls this (the gathering is collective); the parameters of one shard are gathered at a time and
    the process with ``write`` writes them before the next shard is gathered.  The Trainer's own save gathers the
    whole model in process 0 first (DeepSpeed's ``_zero3_consolidated_16bit_state_dict``), which made the save the
    largest memory peak of a ZeRO-3 run.  Tied parameters are written once, under their first name, as
    ``save_pretrained`` does; persistent buffers go with the last shard.  Returns the files written.
    """
    import deepspeed  # the llmq[deepspeed] extra, present wherever a model is ZeRO-3-partitioned

    folder = Path(output_dir)
    parameters = dict(model.named_parameters())  # a tied weight appears once
    buffers = {
        f"{module_name}.{name}".lstrip("."): buffer
        for module_name, module in model.named_modules()
        for name, buffer in module.named_buffers(recurse=False)
        if name not in module._non_persistent_buffers_set
    }
    shards: list[list[str]] = [[]]
    size = 0
    for name, parameter in parameters.items():
        nbytes = getattr(parameter, "ds_numel", parameter.numel()) * parameter.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = (
        [WEIGHTS]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in [*folder.glob("model-*-of-*.safetensors"), folder / WEIGHTS, folder / WEIGHTS_INDEX]:
            stale.unlink(missing_ok=True)  # an earlier save's layout would shadow or mix with this one
    weight_map, total = {}, 0
    for names, file in zip(shards, files):
        with deepspeed.zero.GatheredParameters([parameters[name] for name in names]):
            if write:
                tensors = {name: parameters[name].data.detach().cpu().contiguous() for name in names}
                if file == files[-1]:
                    tensors |= {name: buffer.detach().cpu().contiguous() for name, buffer in buffers.items()}
                save_file(tensors, str(folder / file), metadata={"format": "pt"})
                weight_map |= dict.fromkeys(tensors, file)
                total += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
                del tensors  # before the next shard is gathered
    if write and len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files
