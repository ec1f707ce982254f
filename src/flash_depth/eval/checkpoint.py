"""The checkpoint a user names: a run folder (``runs/x``, holding ``checkpoint/``) or the
checkpoint folder itself, and the run config saved with it."""

from __future__ import annotations

from pathlib import Path


def resolve_checkpoint(path: str | Path, arg: str = "RUN_OR_CHECKPOINT") -> Path:
    """The checkpoint folder (holding config.json) that ``path`` names; FileNotFoundError with a
    one-line reason, naming the argument ``arg``, when there is none."""
    from flash_depth.train.loop import CHECKPOINT, find_checkpoint

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
    from flash_depth.train.loop import CHECKPOINT

    return checkpoint.parent if checkpoint.name in (CHECKPOINT, f".{CHECKPOINT}-old") else checkpoint


def run_config(checkpoint: Path) -> dict:
    """The run_config.yaml saved with a checkpoint as a dict ({} when there is none)."""
    import yaml

    path = Path(checkpoint) / "run_config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
