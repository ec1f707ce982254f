"""Checkpoint folders that survive a kill at any moment, their lookup and loading, and one-line I/O errors.

A checkpoint is written into ``.checkpoint-tmp``; its last file, ``complete.json``, names its step
and is written (and synced) after every other file is on disk. Then ``checkpoint`` is renamed to
``.checkpoint-old``, ``.checkpoint-tmp`` to ``checkpoint``, and the old folder is removed (its
marker first). Wherever a kill lands, one of the three names holds a complete checkpoint, and
:func:`find_checkpoint` takes the complete one with the highest step.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

CHECKPOINT, TMP, OLD = "checkpoint", ".checkpoint-tmp", ".checkpoint-old"
MARKER = "complete.json"


class CheckpointError(RuntimeError):
    """A checkpoint or run file that cannot be written or read, with a one-line reason naming it."""


# ---------------------------------------------------------------- I/O errors
def _errno_of(err: BaseException) -> int | None:
    if isinstance(err, OSError):
        return err.errno
    # safetensors and tokenizers (Rust) report I/O failures as "... (os error 28)"
    match = re.search(r"os error (\d+)", str(err))
    return int(match.group(1)) if match else None


def io_message(code: int | None, path) -> str:
    """What went wrong writing ``path``, in words a user acts on."""
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full while writing {path}"
    if code == errno.EROFS:
        return f"cannot write {path}: read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot write {path}: permission denied"
    return f"cannot write {path}: {os.strerror(code) if code else 'I/O error'}"


@contextmanager
def writing(path):
    """Re-raise a failed write inside the block as a CheckpointError naming ``path`` (or the
    file the OSError names); errors that are not I/O errors pass through."""
    try:
        yield
    except Exception as err:
        code = _errno_of(err)
        if code is None:
            raise
        raise CheckpointError(io_message(code, getattr(err, "filename", None) or path)) from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:  # some filesystems cannot sync a directory; nothing to wait for then
            raise
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` whole or not at all (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path):
        try:
            with open(tmp, "wb") as fh:
                fh.write(data.encode() if isinstance(data, str) else data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync(path.parent)


# ---------------------------------------------------------------- the swap
def _complete_step(folder: Path) -> int | None:
    """The step a complete checkpoint folder holds; None if it is not complete."""
    try:
        return int(json.loads((folder / MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    # written before the marker existed: that writer only ever renamed a whole folder to this name
    if folder.name == CHECKPOINT and (folder / "trainer_state.pt").exists():
        return -1
    return None


def find_checkpoint(out: str | Path) -> Path | None:
    """The run's newest complete checkpoint folder, whatever moment of a swap a kill interrupted."""
    best, best_step = None, None
    for name in (CHECKPOINT, TMP, OLD):
        step = _complete_step(Path(out) / name)
        if step is not None and (best_step is None or step > best_step):
            best, best_step = Path(out) / name, step
    return best


# ---------------------------------------------------------------- what a user names
def resolve_checkpoint(path: str | Path, arg: str = "RUN_OR_CHECKPOINT") -> Path:
    """The checkpoint folder (holding config.json) that ``path`` names; FileNotFoundError with a
    one-line reason, naming the argument ``arg``, when there is none."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{arg}: {path} does not exist; give a run folder or its {CHECKPOINT}/ folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{arg}: {path} is a file; give a run folder or its {CHECKPOINT}/ folder")
    found = find_checkpoint(path)
    if found is not None:
        return found
    if (path / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{arg}: run folder {path} has no {CHECKPOINT}/ yet (a run writes one every "
                                f"train.checkpoint_every steps and at its end)")
    raise FileNotFoundError(f"{arg}: {path} is neither a checkpoint folder (no config.json) nor a run folder "
                            f"(no {CHECKPOINT}/)")


def run_folder(checkpoint: Path) -> Path:
    """The run folder a checkpoint was written into (the checkpoint itself when it stands alone)."""
    return checkpoint.parent if checkpoint.name in (CHECKPOINT, TMP, OLD) else checkpoint


def run_config(checkpoint: Path) -> dict:
    """The run_config.yaml saved with a checkpoint as a dict ({} when there is none)."""
    path = Path(checkpoint) / "run_config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def _discard(folder: Path) -> None:
    # the marker goes first, so a removal cut short leaves nothing that passes for a checkpoint
    (folder / MARKER).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def _settle(out: Path) -> None:
    """Leave the newest complete checkpoint under ``checkpoint`` and no other folder, after a
    swap that a kill interrupted; at every step the newest one stays findable."""
    final, tmp, old = out / CHECKPOINT, out / TMP, out / OLD
    best = find_checkpoint(out)
    for folder in (tmp, old):
        if folder != best and folder.exists():
            _discard(folder)
    if best == old:
        if final.exists():
            _discard(final)
        os.rename(old, final)
    elif best == tmp:
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
    else:
        return
    _fsync(out)
    if old.exists():
        _discard(old)


def _named_tensors(obj, prefix: str = ""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _named_tensors(value, f"{prefix}.{i}")


def nonfinite_tensor(obj) -> str | None:
    """The name of the first floating-point tensor in ``obj`` (nested dicts/lists) holding a NaN
    or an infinity; None if there is none."""
    for name, tensor in _named_tensors(obj):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def write_checkpoint(out: Path, model, model_state: dict, opt_state: dict, trainer_state: dict, tokenizer,
                     run_config: dict) -> Path:
    """Write a checkpoint of step ``trainer_state['step']`` into ``out`` (see the module docstring).
    Refuses non-finite tensors; a failed write removes its temporary folder and leaves the
    previous checkpoint in place."""
    out = Path(out)
    step = int(trainer_state["step"])
    for what, state in (("weight", model_state), ("optimizer state", opt_state)):
        bad = nonfinite_tensor(state)
        if bad is not None:
            raise CheckpointError(f"not writing the checkpoint of step {step}: {what} {bad} holds NaN or inf; "
                                  f"the last good checkpoint is {find_checkpoint(out) or 'none'}")
    with writing(out):
        _settle(out)
    tmp = out / TMP
    current = tmp
    try:
        tmp.mkdir()
        current = tmp / "model.safetensors"  # save_pretrained also writes config.json
        model.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
        current = tmp / "tokenizer.json"
        tokenizer.save(current)
        current = tmp / "trainer_state.pt"
        with open(current, "wb") as fh:  # a file object: a failed write is an OSError with its errno
            torch.save({"optimizer": opt_state, **trainer_state}, fh)
        current = tmp / "run_config.yaml"
        current.write_text(yaml.safe_dump(run_config, sort_keys=False))
        for path in tmp.iterdir():
            current = path
            _fsync(path)
        current = tmp / MARKER
        with open(current, "w") as fh:
            fh.write(json.dumps({"step": step}))
            fh.flush()
            os.fsync(fh.fileno())
        _fsync(tmp)
    except Exception as err:
        code = _errno_of(err)
        if code is None:
            raise
        _discard(tmp)
        raise CheckpointError(io_message(code, getattr(err, "filename", None) or current)) from None
    final, old = out / CHECKPOINT, out / OLD
    with writing(final):
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync(out)
    _discard(old)
    return final


# ---------------------------------------------------------------- loading
def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_checkpoint_files(ckpt: Path) -> None:
    """Every file the model needs is present and whole (JSON parses, safetensors covers its
    declared size), so a truncated copy is named instead of failing deep in a library."""
    import safetensors

    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} is not a checkpoint folder")
    if not (ckpt / "config.json").exists() and find_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt} is a run folder; its checkpoint is {find_checkpoint(ckpt)}")
    for name in ("config.json", "tokenizer.json"):
        path = ckpt / name
        try:
            json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing; {ckpt} is not a whole checkpoint") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path} is corrupt or truncated ({_first_line(err)})") from None
    weights = sorted(ckpt.glob("model*.safetensors"))
    if not weights:
        raise CheckpointError(f"{ckpt / 'model.safetensors'} is missing; {ckpt} is not a whole checkpoint")
    for path in weights:
        try:
            with safetensors.safe_open(path, "pt"):
                pass
        except Exception as err:
            raise CheckpointError(f"{path} is corrupt or truncated ({_first_line(err)})") from None


def load_model(ckpt: Path, **kwargs):
    """The checkpoint's model (``from_pretrained`` keyword arguments pass through); a missing,
    truncated or corrupt file, or a NaN / inf weight, is a CheckpointError naming the file."""
    from flash_depth.models import FlashDepthForCausalLM

    check_checkpoint_files(ckpt)
    model = FlashDepthForCausalLM.from_pretrained(ckpt, **kwargs)
    bad = nonfinite_tensor(model.state_dict())
    if bad is not None:
        raise CheckpointError(f"{Path(ckpt) / 'model.safetensors'}: weight {bad} holds NaN or inf; "
                              "the checkpoint cannot be used")
    return model


def load_trainer_state(ckpt: Path) -> dict:
    """trainer_state.pt (optimizer state, step, tokens, RNG), checked whole and finite."""
    path = Path(ckpt) / "trainer_state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; {ckpt} is not a whole checkpoint") from None
    except Exception as err:
        raise CheckpointError(f"{path} is corrupt or truncated ({_first_line(err)})") from None
    if not isinstance(state, dict) or not {"optimizer", "step", "torch_rng"} <= state.keys():
        raise CheckpointError(f"{path} is not a flash-depth trainer state")
    bad = nonfinite_tensor(state["optimizer"])
    if bad is not None:
        raise CheckpointError(f"{path}: optimizer state {bad} holds NaN or inf; the checkpoint cannot be resumed")
    return state
