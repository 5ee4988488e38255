"""Sampling from a saved checkpoint: what `ddpm sample` and the registered model use.

Every request is checked here, in one place, before any sampling: `num`, `sampler`, `steps`,
`eta` and `seed` each have a stated range, and one `SampleRequestError` names every bad value.
A server also bounds a request's U-Net evaluations (`EvaluationBudget`: what it draws within its
timeout) and gives each draw a deadline, past which the draw abandons itself (`DrawAbandoned`).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import nn

from ddpm import reverse_process
from ddpm.checkpoint import CheckpointError, load_checkpoint, sampling_weights
from ddpm.config import Config, ModelConfig
from ddpm.errors import SampleRequestError
from ddpm.logs import progress_bar
from ddpm.reverse_process import SAMPLERS, NoisePredictor
from ddpm.runtime import select_device
from ddpm.schedule import NoiseSchedule
from ddpm.unet import build_unet

REQUEST_KEYS = ("num", "sampler", "steps", "seed", "eta")  # the registered model's columns
# Images one request may ask of the registered model (all its rows together). 256 DDIM-50 images take
# about 2 min on 2 CPU cores and answer ~4 MB of JSON; draw more with `ddpm sample --out x.npz`.
MAX_REQUEST_IMAGES = 256
MAX_SEED = int(np.iinfo(np.int64).max)  # the registered model's `seed` column is int64; numpy takes any int >= 0
TIMED_CALLS = 3  # forward calls timed for a server's evaluations per second, after one that compiles


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """A checked request: `num` images from `sampler` (DDIM: `steps` steps, stochasticity `eta`), seeded."""

    num: int
    seed: int
    sampler: str
    steps: int  # DDIM steps; the ddpm sampler always walks all T (steps = T)
    eta: float


@dataclasses.dataclass(frozen=True)
class EvaluationBudget:
    """At most `evaluations` U-Net evaluations of one image (num x steps) per request; `why` says where the
    limit comes from and how to raise it, for the error."""

    evaluations: int
    why: str


class DrawAbandoned(TimeoutError):
    """A draw stopped at its deadline, between two steps: nobody waits for its images any more."""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def request_errors(
    num: Any, seed: Any, sampler: Any, steps: Any, eta: Any, timesteps: int, max_num: int | None = None
) -> list[str]:
    """Every problem with a request's values (steps/eta None = not given), each with its allowed range."""
    errors = []
    allowed = f"an integer in [1, {max_num:,}] per request" if max_num else "an integer >= 1"
    if not (_is_int(num) and 1 <= num <= (max_num or num)):
        more = " (draw more with `ddpm sample --out images.npz`)" if _is_int(num) and num > 1 else ""
        errors.append(f"num must be {allowed}, got {num!r}{more}")
    if not (_is_int(seed) and 0 <= seed <= MAX_SEED):
        errors.append(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
    if sampler not in SAMPLERS:
        errors.append(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if steps is not None and not (_is_int(steps) and 1 <= steps <= timesteps):
        errors.append(f"steps must be an integer in [1, {timesteps}] (T, the model's timesteps), got {steps!r}")
    if eta is not None and not (_is_real(eta) and 0.0 <= eta <= 1.0):
        errors.append(f"eta must be a number in [0, 1], got {eta!r}")
    if sampler == "dpmpp_2m" and eta is not None:
        errors.append("sampler dpmpp_2m is deterministic and takes no eta; omit eta, or use sampler ddim")
    if sampler == "ddpm" and ((steps is not None and steps != timesteps) or eta is not None):
        errors.append(
            f"sampler ddpm walks all T = {timesteps} steps and takes no eta; omit steps (or give "
            f"{timesteps}) and eta, or use sampler ddim"
        )
    return errors


@dataclasses.dataclass
class CheckpointSampler:
    config: Config  # the checkpoint's; its sample section gives a request's defaults, batch size and clipping
    schedule: NoiseSchedule
    predict: NoisePredictor

    def request(
        self,
        num: Any,
        seed: Any = 0,
        sampler: Any = None,
        steps: Any = None,
        eta: Any = None,
        max_num: int | None = None,
    ) -> SampleRequest:
        """Check a request (None = the checkpoint's sample config) and fill in its defaults."""
        s, timesteps = self.config.sample, self.schedule.timesteps
        sampler = s.sampler if sampler is None else sampler
        errors = request_errors(num, seed, sampler, steps, eta, timesteps, max_num)
        if errors:
            raise SampleRequestError("bad sampling request: " + "; ".join(errors))
        steps = timesteps if sampler == "ddpm" else int(s.steps if steps is None else steps)
        eta = 0.0 if sampler == "dpmpp_2m" else float(s.eta if eta is None else eta)  # deterministic: says so
        return SampleRequest(int(num), int(seed), sampler, steps, eta)

    def requests(
        self,
        rows: Sequence[Mapping[str, Any]],
        max_num: int = MAX_REQUEST_IMAGES,
        budget: EvaluationBudget | None = None,
    ) -> list[SampleRequest]:
        """Check several rows, each its own request (omitted or None keys take the defaults, seed 0);
        together they may ask at most `max_num` images (so at most `max_num` rows) and `budget`'s
        evaluations. One error names every bad value of every row."""
        if len(rows) > max_num:  # each row asks one image or more: refused whole, not row by row
            raise SampleRequestError(f"bad sampling request: {len(rows):,} rows, more than {max_num:,} per request")
        errors, checked = [] if rows else ["the request has no rows; send at least one, e.g. {num: 4}"], []
        for i, row in enumerate(rows):
            given = {key: value for key, value in row.items() if value is not None}
            if unknown := sorted(set(given) - set(REQUEST_KEYS)):
                errors.append(f"row {i}: unknown {', '.join(unknown)}; a row has {', '.join(REQUEST_KEYS)}")
                continue
            try:
                checked.append(
                    self.request(
                        given.get("num"),
                        given.get("seed", 0),
                        given.get("sampler"),
                        given.get("steps"),
                        given.get("eta"),
                        max_num,
                    )
                )
            except SampleRequestError as e:
                where = f"row {i}: " if len(rows) > 1 else ""
                errors.append(where + str(e).removeprefix("bad sampling request: "))
        total = sum(r.num for r in checked)
        if not errors and total > max_num:
            errors.append(
                f"num: the rows ask {total:,} images together, more than {max_num:,} per request "
                "(draw more with `ddpm sample --out images.npz`)"
            )
        evaluations = sum(evaluations_of(r) for r in checked)
        if not errors and budget is not None and evaluations > budget.evaluations:
            errors.append(
                f"the rows ask {evaluations:,} U-Net evaluations (num x steps; sampler ddpm walks all T = "
                f"{self.schedule.timesteps}), more than the {budget.evaluations:,} {budget.why}; ask fewer images "
                "or steps, or draw them with `ddpm sample --out images.npz`"
            )
        if errors:
            raise SampleRequestError("bad sampling request: " + "; ".join(errors))
        return checked

    def evaluations_per_second(self) -> float:
        """Image evaluations of the U-Net per second at sample.batch_size, timed after a call that compiles."""
        m, batch = self.config.model, self.config.sample.batch_size
        x_t = np.zeros((batch, m.channels, m.image_size, m.image_size), np.float32)
        t = np.full((batch,), self.schedule.timesteps - 1, np.int32)
        self.predict(x_t, t)
        start = time.perf_counter()
        for _ in range(TIMED_CALLS):
            self.predict(x_t, t)
        return TIMED_CALLS * batch / (time.perf_counter() - start)

    def with_batch_size(self, batch_size: int) -> CheckpointSampler:
        sample = dataclasses.replace(self.config.sample, batch_size=batch_size)
        return dataclasses.replace(self, config=dataclasses.replace(self.config, sample=sample))

    def batches(
        self, request: SampleRequest, progress: bool = False, deadline: float | None = None
    ) -> Iterator[np.ndarray]:
        """The request's images, batch after batch of sample.batch_size: (B, C, H, W) float32 in [-1, 1]."""
        s = self.config.sample
        return sample_batches(
            self.predict, self.schedule, request, self.config.model, s.batch_size, s.clip_x0, progress, deadline
        )

    def sample(self, request: SampleRequest, progress: bool = False, deadline: float | None = None) -> np.ndarray:
        """(num, C, H, W) float32 images in [-1, 1]; the same request gives the same images. Past
        `deadline` (time.monotonic()), it raises DrawAbandoned at the next step."""
        return np.concatenate(list(self.batches(request, progress, deadline)))

    def draw(
        self,
        num: int,
        seed: int = 0,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """(num, C, H, W) float32 images in [-1, 1]; None takes the checkpoint's sample config."""
        return self.sample(self.request(num, seed, sampler, steps, eta), progress)


def evaluations_of(request: SampleRequest) -> int:
    """U-Net evaluations of one image the request takes: one per image and step (ddpm: steps = T)."""
    return request.num * request.steps


def until(deadline: float | None, steps: Callable[[Iterable], Iterable]) -> Callable[[Iterable], Iterable]:
    """`steps` (a sampler's step iterator wrapper) that raises DrawAbandoned before a step past `deadline`."""
    if deadline is None:
        return steps

    def checked(iterable: Iterable) -> Iterator:
        for step in steps(iterable):
            if time.monotonic() > deadline:
                raise DrawAbandoned("the draw passed its deadline; abandoned between two steps")
            yield step

    return checked


def load_sampler(path: str | Path, device: str = "auto", use_ema: bool = True) -> CheckpointSampler:
    """Build the network from the checkpoint's own config and load its EMA weights (if any)."""
    select_device(device)
    state = load_checkpoint(path)
    net = build_unet(state.config.model, state.config.train.precision)  # auto for checkpoints from before
    not_loaded, _ = ms.load_param_into_net(net, sampling_weights(state, use_ema), strict_load=True)
    if not_loaded:
        raise CheckpointError(f"{path} lacks weights for {not_loaded[:3]}")
    schedule = NoiseSchedule.from_config(state.config.diffusion)
    predict = make_noise_predictor(net, schedule, state.config.diffusion.prediction)
    return CheckpointSampler(state.config, schedule, predict)


def make_noise_predictor(net: nn.Cell, schedule: NoiseSchedule, prediction: str) -> NoisePredictor:
    """A jitted inference-mode forward of `net` on numpy inputs, its output as the noise it implies."""
    net.set_train(False)

    @ms.jit
    def forward(x_t, t):
        return net(x_t, t)

    def predict(x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        return forward(ms.Tensor(x_t), ms.Tensor(t)).asnumpy()

    return reverse_process.as_noise_predictor(predict, schedule, prediction)


def sample_batches(
    predict: NoisePredictor,
    schedule: NoiseSchedule,
    request: SampleRequest,
    model: ModelConfig,
    batch_size: int,
    clip_x0: bool,
    progress: bool = False,
    deadline: float | None = None,
) -> Iterator[np.ndarray]:
    """The request's images in (B, C, H, W) batches of `batch_size`, float32 in [-1, 1]; batch i is
    seeded [seed, i], so the same request gives the same images. DrawAbandoned past `deadline`."""
    starts = range(0, request.num, batch_size)
    images_bar = progress_bar(
        total=request.num, desc=f"sampling {request.sampler}", unit="img", images_per_unit=1, enabled=progress
    )
    with images_bar:
        for i, start in enumerate(starts):
            size = min(batch_size, request.num - start)
            desc = f"batch {i + 1}/{len(starts)}"
            bar = functools.partial(
                progress_bar, desc=desc, total=None, unit="step", enabled=progress, inner=True, leave=False
            )
            x0 = reverse_process.sample(
                predict,
                schedule,
                (size, model.channels, model.image_size, model.image_size),
                [request.seed, i],
                request.sampler,
                request.steps,
                request.eta,
                clip_x0,
                until(deadline, bar),
            )
            images_bar.update(size)
            yield np.clip(x0, -1.0, 1.0)
