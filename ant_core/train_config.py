"""TrainConfig: every setting of a training run, validated, from defaults, a JSON/YAML file and
command-line flags (in that order of precedence, last wins)."""
from __future__ import annotations

import dataclasses
import json
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import mtl
from .checks import TORCH_SEEDS, check_float
from .diffusion import PREDICTIONS
from .schedules import SCHEDULES

OBJECTIVES = ("timestep", "snr", "log_snr", "affinity", "affinity_medoid", "affinity_average")
GRADIENT_METHODS = ("pcgrad", "nashmtl", "mgda", "cagrad", "imtlg", "alignedmtl")
#: fields naming files: an existing path is made absolute by ``validate``; on resume a saved
#: relative path (configs written before that) matches the same file given another way
PATH_FIELDS = ("data", "affinity")
BUILTIN_DATA = ("shapes", "digits")
#: config fields that may differ when resuming a run
RESUME_MUTABLE = ("steps", "out", "log_every", "save_every", "keep_last", "sample_every",
                  "num_samples", "sample_steps", "progress", "device", "compile")
_CHOICES = {
    "prediction": PREDICTIONS, "schedule": tuple(sorted(SCHEDULES)), "objective": OBJECTIVES,
    "sampler": ("stratified", "uniform"), "weighting": ("none", "min_snr", "p2", "edm2"),
    "engine": ("autograd", "one-backward", "one-backward-lean"),
    "amp": ("none", "bf16", "fp16"),
}


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says why and what was kept."""


@dataclass
class TrainConfig:
    """Everything a training run is made of; see ``ant train --help`` for each field."""

    # data
    data: str = "shapes"               # "shapes", "digits", an image folder or a .npy/.npz file
                                       # (existing paths are stored absolute, see validate)
    num_images: int = 2000             # built-in shapes: number of training images
    image_size: int = 16               # built-in data / image folders: side in pixels
    data_seed: int = 0
    class_conditional: bool = False
    label_dropout: float = 0.0         # share of labels replaced by the null label (for CFG)
    # model
    model: str = "dit-tiny"            # a preset (unet-tiny, dit-tiny, ...) or "unet" / "dit"
    model_config: dict = field(default_factory=dict)
    # diffusion
    schedule: str = "linear"
    T: int = 1000
    prediction: str = "eps"
    # clustering (ANT)
    objective: str = "log_snr"
    k: int = 5
    affinity: str | None = None        # T x T .npy for the affinity objectives
    sampler: str = "stratified"
    # loss
    weighting: str = "none"
    min_snr_gamma: float = 5.0
    p2_k: float = 1.0
    p2_gamma: float = 1.0
    # multi-task method
    method: str = "uw"                 # "vanilla" or any ant_core.mtl.available() name
    method_config: dict = field(default_factory=dict)
    engine: str = "autograd"           # per-task gradients of gradient methods
    uw_lr: float = 0.025               # learning rate of the method's own parameters (UW)
    # optimisation
    steps: int = 1000
    batch_size: int = 32               # per process
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0             # max gradient norm of the model; 0 disables
    ema_decay: float = 0.999
    amp: str = "none"
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    # output
    out: str = "runs/ant"
    log_every: int = 10
    save_every: int = 0                # 0: only at the end (and on SIGTERM)
    keep_last: int = 3
    sample_every: int = 0              # 0: only at the end
    num_samples: int = 16
    sample_steps: int = 50             # DDIM steps for the sample grids
    progress: bool = True

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a dict; unknown keys and wrongly typed values raise ValueError."""
        if not isinstance(values, dict):
            raise ValueError(f"a config must be a mapping of field names, got "
                             f"{type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(repr, set(values) - names))  # (keys of any type, e.g. YAML's 1)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known: {sorted(names)}")
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def from_file(cls, path, **overrides) -> "TrainConfig":
        """Read a .json (always) or .yaml/.yml (needs PyYAML) file; ``overrides`` win."""
        return cls.from_dict({**read_config_file(path), **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TrainConfig":
        """Check every field; ValueError naming the field on the first bad one."""
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), f.default
            if default is dataclasses.MISSING:
                default = f.default_factory()
            if default is None:
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{f.name} must be a string path or null, got {value!r}")
                continue
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):  # numpy integers too, stored as int
                ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
                if ok:
                    object.__setattr__(self, f.name, int(value))
            elif isinstance(default, float):  # numpy numbers too, stored as float
                try:
                    object.__setattr__(self, f.name, check_float(f.name, value))
                    ok = True
                except (TypeError, ValueError):
                    ok = False
            else:
                ok = isinstance(value, type(default))
            if not ok:
                raise ValueError(f"{f.name} must be a {type(default).__name__}"
                                 f"{' (finite)' if isinstance(default, float) else ''}, "
                                 f"got {value!r}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got "
                                 f"{getattr(self, name)!r}")
        methods = ["vanilla", *mtl.available()]
        if self.method.lower().replace("-", "").replace("_", "") not in methods:
            raise ValueError(f"method must be one of {methods}, got {self.method!r}")
        for name, low in (("num_images", 1), ("image_size", 4), ("T", 2), ("k", 1),
                          ("steps", 1), ("batch_size", 1), ("num_samples", 1),
                          ("sample_steps", 1), ("log_every", 1), ("data_seed", 0),
                          ("seed", 0), ("warmup_steps", 0), ("save_every", 0),
                          ("keep_last", 0), ("sample_every", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not self.data:
            raise ValueError("data must not be empty (a built-in name, a folder or a file)")
        if not self.out:  # "" would write the whole run into the current folder
            raise ValueError("out must not be empty (the run folder)")
        if self.affinity == "":  # "" exists: the current folder
            raise ValueError("affinity must not be empty (a T x T .npy file, or null)")
        if self.seed > TORCH_SEEDS[1]:
            raise ValueError(f"seed must be <= {TORCH_SEEDS[1]} (torch's seed range), got "
                             f"{self.seed}")
        if self.k > self.T:
            raise ValueError(f"k must be <= T, got k={self.k} > T={self.T}")
        if self.sample_steps > self.T:
            raise ValueError(f"sample_steps must be <= T={self.T}, got {self.sample_steps}")
        for name in ("lr", "uw_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "p2_gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("min_snr_gamma", "p2_k"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.label_dropout > 0 and not self.class_conditional:
            raise ValueError("label_dropout applies to class-conditional training only "
                             "(set class_conditional=True)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.objective.startswith("affinity") != (self.affinity is not None):
            raise ValueError("affinity (a T x T .npy file) must be given exactly when objective "
                             f"is an affinity objective (objective={self.objective!r})")
        if self.engine != "autograd" and self.method_key not in GRADIENT_METHODS:
            raise ValueError(f"engine={self.engine!r} applies to the gradient methods "
                             f"{list(GRADIENT_METHODS)} only, not method={self.method!r}")
        if self.weighting == "edm2" and self.method_key not in ("vanilla", "ew"):
            raise ValueError(f"weighting='edm2' learns its own weights per noise level and its "
                             f"per-sample objective loss·e^(-u) + u can be negative, which the "
                             f"statistics of UW, FAMO, DWA, GradNorm (logs, ratios) cannot take: "
                             f"use method 'vanilla' or 'ew', not method={self.method!r}")
        if self.compile and self.engine != "autograd":
            raise ValueError("compile=True works with engine='autograd' only (the one-backward "
                             "engine hooks the eager modules)")
        check_device(self.device)
        for name in PATH_FIELDS:  # absolute, so that the run's config.json works from anywhere
            value = getattr(self, name)
            if value is not None and Path(value).exists() and \
                    not (name == "data" and value.lower() in BUILTIN_DATA):
                object.__setattr__(self, name, os.path.abspath(value))
        return self

    @property
    def method_key(self) -> str:
        return self.method.lower().replace("-", "").replace("_", "")

    @property
    def num_clusters(self) -> int:
        return 1 if self.method_key == "vanilla" else self.k


def read_config_file(path) -> dict:
    """The field values a .json (always) or .yaml/.yml (needs PyYAML) config file sets — only
    those, no defaults filled in, so that the file can be merged over a resumed run's config."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {path} is not UTF-8 text: {exc}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"reading {path} needs PyYAML (pip install pyyaml); "
                             "or use a .json config") from None
        try:
            values = yaml.load(text, Loader=_yaml_loader(yaml)) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of field names")
    return values


def _yaml_loader(yaml):
    """PyYAML's safe loader with YAML 1.2's numbers (the core schema): ``1e-3``, ``5E4``,
    ``-.5`` are floats and ``010`` is ten. PyYAML follows YAML 1.1, where the first two need a
    dot and a signed exponent, ``-.5`` is a string, ``010`` is octal 8 and ``1:30`` is 90."""
    int_tag, float_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (int_tag, float_tag)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(  # before the float pattern, which also matches "10"
        int_tag, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
    Loader.add_implicit_resolver(
        float_tag, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."))

    def construct_int(loader, node):
        text = loader.construct_scalar(node)
        base = {"0o": 8, "0x": 16}.get(text[:2], 10)
        return int(text[2:] if base != 10 else text, base)

    def construct_float(loader, node):
        text = loader.construct_scalar(node).lower()
        return float(text.replace(".inf", "inf").replace(".nan", "nan"))

    Loader.add_constructor(int_tag, construct_int)
    Loader.add_constructor(float_tag, construct_float)
    return Loader


def check_device(device: str) -> str:
    """``device`` must be 'auto', 'cpu', 'cuda' or 'cuda:N' (ValueError otherwise)."""
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return device


def require_available(device) -> None:
    """ValueError when ``device`` (a name or torch.device) is a CUDA device this machine lacks
    (no CUDA at all, or an index past the devices there are)."""
    import torch

    name = str(device)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: this torch has no CUDA device")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ValueError(f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def resolve_device(device: str) -> str:
    """A checked device name: 'auto' is 'cuda' when available, else 'cpu'."""
    import torch

    if check_device(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    require_available(device)
    return device


def jsonable(value):
    """Tuples -> lists recursively (so configs compare and serialise the same everywhere)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
