"""Typed, frozen configuration loaded once from params.yaml, or from an overlay of it.

Every section is a frozen dataclass; `load_config` rejects unknown keys, wrong types and
out-of-range values, listing every bad field in one error before anything starts. The file may be
an overlay of params.yaml (ddpm/params_file.py).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ddpm.data import TEST_SIZE
from ddpm.errors import ConfigError
from ddpm.params_file import ParamsFile, read_params

Device = Literal["auto", "CPU", "GPU", "Ascend"]
Schedule = Literal["linear", "scaled_linear", "cosine", "quadratic", "sigmoid"]
LossType = Literal["l1", "l2", "huber"]
LossWeighting = Literal["none", "min_snr", "sigmoid"]
Prediction = Literal["eps", "v"]
LrSchedule = Literal["constant", "cosine", "tutorial_cosine"]
Sampler = Literal["ddpm", "ddim", "dpmpp_2m"]
Precision = Literal["auto", "fp32", "bf16"]
MAX_CLASSIFIER_BLOCKS = 3  # each block halves 28x28: 14, 7, 3
MAX_SIGMA_REL = 0.28  # a post-hoc EMA's length; a weighting that never falls with age reaches 1/sqrt(12) = 0.289


def is_posthoc_length(sigma_rel: float) -> bool:
    """A post-hoc EMA length (sigma_rel) in (0, MAX_SIGMA_REL]: train.posthoc_* and `ddpm posthoc-ema`."""
    return 0.0 < sigma_rel <= MAX_SIGMA_REL


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/fashion-mnist"  # directory holding the four decompressed IDX files
    limit: int = 0  # use only the first N training images; 0 means all 60,000
    flip: bool = True  # random horizontal flip, as the tutorial does
    num_workers: int = 2  # dataset map workers

    def check(self) -> list[str]:
        return _at_least(self, limit=0, num_workers=1)


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 28
    channels: int = 1
    dim: int = 28
    dim_mults: tuple[int, ...] = (1, 2, 4)
    convnext_mult: int = 2

    def check(self) -> list[str]:
        errors = _at_least(self, image_size=4, channels=1, dim=2, convnext_mult=1)
        if not self.dim_mults or any(m < 1 for m in self.dim_mults):
            errors.append(f"model.dim_mults: must be a non-empty list of positive ints, got {list(self.dim_mults)}")
        downsamplings = len(self.dim_mults) - 1
        if self.image_size % (2**downsamplings):
            errors.append(f"model.image_size: {self.image_size} is not divisible by 2**{downsamplings}")
        if self.dim % 2:
            errors.append(f"model.dim: must be even (sinusoidal embedding halves it), got {self.dim}")
        return errors


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 200
    schedule: Schedule = "scaled_linear"  # the tutorial's "linear" leaves alpha_bar_T = 0.132
    beta_start: float = 1e-4
    beta_end: float = 0.02
    loss: LossType = "huber"
    loss_weighting: LossWeighting = "none"  # min_snr (Hang et al., 2023) | sigmoid (Kingma & Gao, 2023)
    min_snr_gamma: float = 5.0
    sigmoid_bias: float = 2.0  # sigmoid: w(log SNR) = sigmoid(bias - log SNR): timesteps noisier than bias weigh fully
    prediction: Prediction = "eps"  # the network's output: the noise, or v = sqrt(ab) noise - sqrt(1 - ab) x0

    def check(self) -> list[str]:
        errors = _at_least(self, timesteps=2)
        if not math.isfinite(self.sigmoid_bias):
            errors.append(f"diffusion.sigmoid_bias: must be a finite number, got {self.sigmoid_bias}")
        if not self.min_snr_gamma > 0:
            errors.append(f"diffusion.min_snr_gamma: must be > 0, got {self.min_snr_gamma}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            errors.append(
                f"diffusion.beta_start/beta_end: need 0 < start < end < 1, got {self.beta_start}, {self.beta_end}"
            )
        return errors


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-4
    lr_schedule: LrSchedule = "tutorial_cosine"
    min_lr: float = 1e-7
    # Epochs the schedule spans (0: train.epochs). Fixed for a training: more epochs than this continue
    # at the schedule's last rate, fewer stop part-way, and a resume may extend train.epochs either way.
    lr_epochs: int = 0
    warmup_steps: int = 0
    adam_beta2: float = 0.999  # Adam's second-moment decay: 0.99 forgets stale gradient scales 10x sooner
    ema_decay: float = 0.0  # 0 disables EMA; the decay ramps up as (1+n)/(10+n) up to this value
    # Post-hoc EMA (ddpm.posthoc_ema): the lengths (sigma_rel) of power-function averages kept beside the
    # EMA and snapshotted every posthoc_every steps and at each epoch's end; () = none.
    posthoc_ema: tuple[float, ...] = ()
    posthoc_every: int = 500
    # Lengths the pipeline rebuilds after training and chooses among, with the EMA and the raw weights,
    # by held-out denoising loss: the weights it evaluates and registers. () = the EMA's. Needs posthoc_ema.
    posthoc_lengths: tuple[float, ...] = ()
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "auto"  # the convs' products, training and sampling; auto: bf16 where the CPU has bf16 units
    threads: int = 0  # CPU kernel threads; 0 = MindSpore's default. 1 lets two runs pinned one per core make ~1.3x
    workers: int = 1  # data-parallel processes under msrun, each on batch_size / workers images of every batch
    checkpoint_dir: str = "checkpoints"
    checkpoint_minutes: float = 10.0  # also checkpoint mid-epoch when this long has passed since the last; 0 = off
    sample_every: int = 1  # draw a preview grid every N epochs for the callbacks; 0 never
    # The preview grid: DDIM (stochastic, clipped) with its own settings, apart from the `sample`
    # section, which is the evaluation's: changing how a model is scored never re-runs its training.
    sample_num: int = 16
    sample_steps: int = 20
    sample_seed: int = 0

    @property
    def lr_span(self) -> int:
        """Epochs the learning-rate schedule spans."""
        return self.lr_epochs or self.epochs

    def check(self) -> list[str]:
        errors = _at_least(
            self,
            epochs=1,
            batch_size=1,
            lr_epochs=0,
            warmup_steps=0,
            seed=0,
            sample_every=0,
            workers=1,
            threads=0,
            sample_num=1,
            sample_steps=1,
            sample_seed=0,
            posthoc_every=1,
        )
        for key in ("posthoc_ema", "posthoc_lengths"):
            lengths = getattr(self, key)
            # distinct to 3 decimals: a length names its profile's tensors and its average's file (0.050)
            if not all(map(is_posthoc_length, lengths)) or len({f"{s:.3f}" for s in lengths}) < len(lengths):
                errors.append(
                    f"train.{key}: must be lengths in (0, {MAX_SIGMA_REL}], distinct to 3 decimals, got {list(lengths)}"
                )
        if self.posthoc_lengths and not self.posthoc_ema:
            errors.append("train.posthoc_lengths: needs train.posthoc_ema, the profiles they are rebuilt from")
        if self.workers >= 1 and self.batch_size % self.workers:
            errors.append(
                f"train.batch_size: {self.batch_size} does not split evenly over train.workers={self.workers}"
            )
        if not 0.0 < self.lr < 1.0:
            errors.append(f"train.lr: must be in (0, 1), got {self.lr}")
        if not 0.0 <= self.min_lr <= self.lr:
            errors.append(f"train.min_lr: must be in [0, lr], got {self.min_lr}")
        if not self.checkpoint_minutes >= 0.0:
            errors.append(
                f"train.checkpoint_minutes: must be >= 0 (0 = only at epoch ends), got {self.checkpoint_minutes}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            errors.append(f"train.ema_decay: must be in [0, 1), got {self.ema_decay}")
        if not 0.0 < self.adam_beta2 < 1.0:
            errors.append(f"train.adam_beta2: must be in (0, 1), got {self.adam_beta2}")
        return errors


@dataclass(frozen=True)
class SampleConfig:
    sampler: Sampler = "ddim"
    steps: int = 50  # DDIM and DPM-Solver++(2M) steps; DDPM always walks the full chain
    eta: float = 0.0  # DDIM stochasticity: 0 deterministic, 1 DDPM-like (the other samplers take none)
    clip_x0: bool = True  # clip the predicted x0 to [-1, 1] before the posterior step
    num: int = 64  # images per grid
    seed: int = 0
    batch_size: int = 64

    def check(self) -> list[str]:
        errors = _at_least(self, steps=1, num=1, seed=0, batch_size=1)
        if not 0.0 <= self.eta <= 1.0:
            errors.append(f"sample.eta: must be in [0, 1], got {self.eta}")
        return errors


@dataclass(frozen=True)
class EvaluateConfig:
    num_images: int = 500  # test images for the held-out denoising loss
    t_points: int = 10  # evenly spaced timesteps at which every image is noised
    seed: int = 0  # fixes the noise, so candidates are scored on identical inputs
    batch_size: int = 100
    fid_samples: int = 2000  # N: samples drawn for FID, and N train vs N test images for its floor

    def check(self) -> list[str]:
        errors = _at_least(self, num_images=1, t_points=1, seed=0, batch_size=1, fid_samples=2)
        for key in ("num_images", "fid_samples"):
            if getattr(self, key) > TEST_SIZE:
                errors.append(f"evaluate.{key}: the test split has 10,000 images, got {getattr(self, key)}")
        if self.num_images % self.batch_size:
            errors.append(f"evaluate.num_images: {self.num_images} is not a multiple of batch_size {self.batch_size}")
        return errors


@dataclass(frozen=True)
class ClassifierConfig:
    """The Fashion-MNIST CNN whose penultimate features define FID and whose softmax gives class coverage."""

    channels: tuple[int, ...] = (32, 64)  # one block each: 3x3 conv, batch norm, ReLU, 2x2 max-pool
    features: int = 128  # penultimate width: the dimension of the FID features
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3  # Adam, cosine-decayed to 0 over the run
    limit: int = 0  # use only the first N training images; 0 means all 60,000
    seed: int = 0
    checkpoint: str = "models/classifier.ckpt"

    def check(self) -> list[str]:
        errors = _at_least(self, features=2, epochs=1, batch_size=1, limit=0, seed=0)
        if not self.channels or any(c < 1 for c in self.channels) or len(self.channels) > MAX_CLASSIFIER_BLOCKS:
            errors.append(
                f"classifier.channels: need 1 to {MAX_CLASSIFIER_BLOCKS} positive ints "
                f"(28 -> 14 -> 7 -> 3), got {list(self.channels)}"
            )
        if not 0.0 < self.lr < 1.0:
            errors.append(f"classifier.lr: must be in (0, 1), got {self.lr}")
        if self.limit and self.limit < self.batch_size:
            errors.append(f"classifier.limit: {self.limit} gives no full batch of {self.batch_size}")
        if not self.checkpoint:
            errors.append("classifier.checkpoint: must not be empty")
        return errors


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def check(self) -> list[str]:
        """Cross-section constraints; each section checks its own ranges."""
        errors = []
        if self.sample.steps > self.diffusion.timesteps:
            errors.append(f"sample.steps: {self.sample.steps} exceeds diffusion.timesteps {self.diffusion.timesteps}")
        if self.train.sample_steps > self.diffusion.timesteps:
            errors.append(
                f"train.sample_steps: {self.train.sample_steps} exceeds diffusion.timesteps {self.diffusion.timesteps}"
            )
        if self.evaluate.t_points > self.diffusion.timesteps:
            errors.append(f"evaluate.t_points: {self.evaluate.t_points} exceeds diffusion.timesteps")
        if self.data.limit and self.data.limit < self.train.batch_size:  # training drops the incomplete batch
            errors.append(
                f"data.limit: {self.data.limit} images give no full batch of train.batch_size {self.train.batch_size}; "
                f"raise data.limit (0 for all) or lower train.batch_size"
            )
        return errors

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-safe data (tuples become lists)."""
        return params_data(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
# Sections of params.yaml that the pipeline (flows/) reads and validates; ddpm leaves them alone.
PIPELINE_SECTIONS = ("fetch", "tracking", "registry", "workspace")


# {"train.lr": 0.001}: dotted keys and typed values. `--set` strings become this once, at the entry
# point (parse_sets); a deployment's `overrides` parameter already is this.
Overrides = typing.Mapping[str, Any]


NO_VALUE = object()  # an override given without "=value": an error when it is applied, with the others


def parse_sets(items: typing.Sequence[str]) -> dict[str, Any]:
    """The entry points' `--set section.key=value` options -> Overrides, each value read as YAML (as
    `dvc exp run -S` does). Malformed ones are kept, so that validation names them with every other
    bad value in one error."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if sep else NO_VALUE
        except yaml.YAMLError:
            value = text
        overrides[key.strip()] = value
    return overrides


def load_config(
    path: str | Path | None = None,
    overrides: Overrides | None = None,
    extra_sections: typing.Collection[str] = PIPELINE_SECTIONS,
) -> Config:
    """Read params.yaml (or an overlay of it, or defaults), apply the overrides, validate everything.

    Sections named in `extra_sections` belong to other readers of the same file (the
    pipeline's) and are left to them; any other unknown section is an error.
    """
    params = read_params(path, known=(*SECTIONS, *extra_sections)) if path is not None else ParamsFile({}, {})
    return config_from_dict(params.sections, overrides, extra_sections, params.origins)


def config_from_dict(
    raw: dict[str, Any],
    overrides: Overrides | None = None,
    extra_sections: typing.Collection[str] = (),
    origins: typing.Mapping[str, str] | None = None,
) -> Config:
    """Validate `raw` with the overrides applied; `origins` (ParamsFile's) names the file of an unknown key."""
    errors, config = build_config(Config, raw, overrides, origins, extra_sections)
    if config is None:
        raise invalid(errors)
    return config


class Sections(typing.Protocol):
    """A schema: a frozen dataclass whose fields are section dataclasses (Config, flows' PipelineConfig)."""

    def check(self) -> list[str]:
        """Constraints across its sections; each section checks its own."""
        ...


S = typing.TypeVar("S", bound=Sections)


def build_config(
    schema: type[S],
    raw: typing.Mapping[str, Any],
    overrides: Overrides | None = None,
    origins: typing.Mapping[str, str] | None = None,
    extra_sections: typing.Collection[str] = (),
) -> tuple[list[str], S | None]:
    """Validate the sections of `schema` in `raw` with the overrides applied: every error, and the
    built schema (None when there is any error). Sections in `extra_sections` belong to another
    schema and are left to it; any other section `schema` lacks is an error. `origins` (ParamsFile's)
    names the file of an unknown key."""
    origins = origins or {}
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    errors = apply_overrides(raw, overrides or {})
    classes = typing.get_type_hints(schema)  # each section's dataclass, by section name
    for name, value in raw.items():
        if name in extra_sections:
            continue
        if name not in classes:
            errors.append(f"{name}: unknown section{in_file(origins, name)} (known: {', '.join(classes)})")
        elif not isinstance(value, dict):
            errors.append(not_a_mapping(name, value))
    sections = {}
    for name, cls in classes.items():
        values = raw.get(name)
        section_errors, section = build_section(name, cls, values if isinstance(values, dict) else {}, origins)
        errors += section_errors + section.check()  # ranges of the values that parsed
        sections[name] = section
    if errors:
        return errors, None
    built = schema(**sections)
    errors = built.check()
    return errors, None if errors else built


def invalid(errors: list[str]) -> ConfigError:
    """The one error that lists every bad field, one a line."""
    return ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


def params_data(*schemas: Any) -> dict[str, Any]:
    """Built schemas (Config, PipelineConfig) as the plain data of one params file: YAML/JSON-safe,
    tuples as lists, so that `build_config` reads it back to equal objects."""
    data: dict[str, Any] = {}
    for built in schemas:
        data.update(
            dataclasses.asdict(
                built, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v for k, v in items}
            )
        )
    return data


def apply_overrides(raw: dict[str, Any], overrides: Overrides) -> list[str]:
    """Set each `section.key` of `overrides` in `raw` in place; return errors."""
    errors = []
    for key, value in overrides.items():
        section, dot, name = key.partition(".")
        if not (section and dot and name) or value is NO_VALUE:
            errors.append(f"override {key!r}: expected section.key=value")
            continue
        raw.setdefault(section, {})
        if isinstance(raw[section], dict):
            raw[section][name] = value
    return errors


def build_section(
    name: str, cls: type, values: dict[str, Any], origins: typing.Mapping[str, str] | None = None
) -> tuple[list[str], Any]:
    """Type-check `values` against the dataclass `cls`; return errors and the section built from
    the values that parsed (defaults elsewhere)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    errors = [
        f"{name}.{k}: unknown key{in_file(origins or {}, f'{name}.{k}')} (known: {', '.join(sorted(known))})"
        for k in values
        if k not in known
    ]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            continue
        ok, coerced = _coerce(value, hints[key])
        if ok:
            kwargs[key] = coerced
        else:
            errors.append(f"{name}.{key}: expected {_type_name(hints[key])}, got {value!r}")
    return errors, cls(**kwargs)


def in_file(origins: typing.Mapping[str, str], key: str) -> str:
    """Where `key` came from, for an error: " in FILE" for a params file's key, "" for an override's."""
    return f" in {origins[key]}" if key in origins else ""


def not_a_mapping(section: str, value: Any) -> str:
    """The error for a section that is a scalar or a list; its type, not its text, which may be anything."""
    return f"{section}: must be a mapping of keys, got a {type(value).__name__}"


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint), value
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [_coerce(v, item) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 (PyYAML) reads 1e-4, without a dot, as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config type {hint}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if typing.get_origin(hint) is tuple:
        return f"a list of {typing.get_args(hint)[0].__name__}"
    return hint.__name__ if isinstance(hint, type) else str(hint)


def _at_least(section: Any, **minimums: int) -> list[str]:
    prefix = _SECTION_OF.get(type(section), type(section).__name__)
    return [
        f"{prefix}.{k}: must be >= {m}, got {getattr(section, k)}"
        for k, m in minimums.items()
        if getattr(section, k) < m
    ]


_SECTION_OF = {cls: name for name, cls in typing.get_type_hints(Config).items()}
