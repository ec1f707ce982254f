"""Run configuration: YAML file + ``section.key=value`` overrides, checked against known keys."""

from __future__ import annotations

import copy
import inspect
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used, with a one-line reason."""


@dataclass
class DataConfig:
    source: str = "shakespeare"  # see flash_depth.data.sources
    tokenizer: str = "bpe"  # "bpe" (trained locally and cached), "bytes", or a tokenizer.json path
    vocab_size: int = 1024  # for "bpe"
    text_field: str = "text"
    split: str = "train"
    val_fraction: float = 0.05  # the last documents (or tokens, for shards) held out
    max_documents: int | None = None
    cache_dir: str | None = None  # tokenizer + tokenized cache; default ~/.cache/flash-depth
    # attend only within documents (the <|endoftext|>-separated ones a window holds); off: across
    # them, as most pretraining runs do (faster; see docs/model.md, "Packed documents")
    document_masking: bool = False


@dataclass
class TrainConfig:
    seq_len: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 400
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    compile: bool = False  # torch.compile each block (FlashDepthModel.compile_blocks)
    cuda_graph: bool = False  # replay the whole step from one CUDA graph (train/cuda_graph.py); one GPU
    activation_checkpointing: bool = False
    distributed: str = "ddp"  # "ddp" or "fsdp" under torchrun
    nonfinite: str = "stop"  # a NaN/inf loss or gradient: "stop" the run, or "skip" the update
    max_skips: int = 10  # with nonfinite="skip": stop after this many skipped steps in a row
    progress_every: float = 30.0  # seconds between progress lines when stderr is not a terminal


DEFAULT_PRESET = "tiny"  # the model preset of a config that names none


@dataclass
class RunConfig:
    model: dict = field(default_factory=lambda: {"preset": DEFAULT_PRESET, "depth_mechanism": "moda"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {"model": dict(self.model), "data": asdict(self.data), "train": asdict(self.train)}


def _model_keys() -> set[str]:
    from flash_depth.models import FlashDepthConfig

    params = inspect.signature(FlashDepthConfig.__init__).parameters
    return {"preset"} | {k for k, p in params.items() if k != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


def _set(cfg: RunConfig, dotted: str, value) -> None:
    section, _, key = dotted.partition(".")
    if section == "model":
        if key not in _model_keys():
            raise ConfigError(f"unknown config key {dotted!r}; model keys: {', '.join(sorted(_model_keys()))}")
        cfg.model[key] = value
        return
    if section not in ("data", "train") or not key:
        raise ConfigError(f"unknown config key {dotted!r}; use model.KEY, data.KEY or train.KEY")
    target = getattr(cfg, section)
    known = {f.name: f for f in fields(target)}
    if key not in known:
        raise ConfigError(f"unknown config key {dotted!r}; {section} keys: {', '.join(sorted(known))}")
    default = getattr(type(target)(), key)
    if isinstance(default, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if default is not None and value is not None and not isinstance(value, type(default)):
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        else:
            raise ConfigError(f"{dotted} must be {type(default).__name__}, got {value!r}")
    setattr(target, key, value)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the YAML file's sections, then ``section.key=value`` overrides."""
    cfg = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping with sections model/data/train")
        for section, values in raw.items():
            if section not in ("model", "data", "train") or not isinstance(values, dict):
                raise ConfigError(f"{path}: unknown section {section!r} (use model, data, train)")
            if section == "model":
                cfg.model = {}
            for key, value in values.items():
                _set(cfg, f"{section}.{key}", value)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, _, text = item.partition("=")
        _set(cfg, key.strip(), yaml.safe_load(text) if text.strip() else None)
    t = cfg.train
    for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches",
                 "checkpoint_every", "log_every", "max_skips"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    for name in ("lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if t.distributed not in ("ddp", "fsdp"):
        raise ConfigError(f"train.distributed must be 'ddp' or 'fsdp', got {t.distributed!r}")
    if t.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.nonfinite must be 'stop' or 'skip', got {t.nonfinite!r}")
    if t.progress_every < 0:
        raise ConfigError(f"train.progress_every must be >= 0 seconds, got {t.progress_every}")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    if cfg.data.document_masking and t.cuda_graph:
        raise ConfigError("data.document_masking=true cannot run under train.cuda_graph=true: each batch's "
                          "documents set the attention's shapes, which a captured step cannot change")
    return cfg


# What a resumed run may change: when it logs, evaluates, saves, reports and stops, what it does
# on a non-finite step, how the same step executes (compiled, graphed, recomputed: the GPU tests
# resume across them) and where caches go. Any other setting shapes the model, the data or the
# optimisation, and a run resumed with another value would silently be a different run.
RESUMABLE = ("train.max_steps", "train.eval_every", "train.log_every", "train.checkpoint_every",
             "train.nonfinite", "train.max_skips", "train.progress_every", "train.compile", "train.cuda_graph",
             "train.activation_checkpointing", "data.cache_dir")


def setting_keys(cfg: RunConfig) -> list[str]:
    """Every ``section.key`` that ``cfg`` sets."""
    return [f"{section}.{key}" for section, values in cfg.to_dict().items() for key in values]


def given_keys(path: str | Path | None, overrides: list[str] = ()) -> list[str]:
    """The settings a command line names (in its --config file and its overrides), as opposed
    to those it leaves at their defaults. Call after :func:`load_config` accepted them."""
    keys = []
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        keys += [f"{section}.{key}" for section, values in raw.items() for key in values]
    return keys + [item.partition("=")[0].strip() for item in overrides]


def _value(cfg: RunConfig, key: str, model_defaults: dict):
    section, _, name = key.partition(".")
    if section == "model":
        return cfg.model.get(name, model_defaults.get(name))
    return getattr(getattr(cfg, section), name)


def resume_config(saved: RunConfig, asked: RunConfig, keys, model_defaults: dict,
                  where: str) -> tuple[RunConfig, dict]:
    """The config a resumed run continues with: ``saved`` (the run's own, read from ``where``)
    with ``asked``'s values for ``keys`` where a resume may change them, and those changes as
    ``{key: [old, new]}``. ``model_defaults`` gives the model settings a config leaves out (the
    checkpoint's config.json and the default preset). Another key that differs is a ConfigError
    naming it and both values."""
    merged, changes, refused = copy.deepcopy(saved), {}, []
    defaults = {"preset": DEFAULT_PRESET, **model_defaults}
    for key in dict.fromkeys(keys):
        old, new = _value(saved, key, defaults), _value(asked, key, defaults)
        if old == new:
            continue
        if key in RESUMABLE:
            _set(merged, key, new)
            changes[key] = [old, new]
        else:
            refused.append(f"{key} is {old!r} in the run but {new!r} was given")
    if refused:
        raise ConfigError(f"--resume continues the run as {where} set it: {'; '.join(refused)} "
                          f"(a resume may change only {', '.join(RESUMABLE)})")
    return merged, changes
