"""PyTorch (CPU) reference timings of our U-Net: eager or torch.compile, in fp32 or bf16 mixed precision.

    uv run --with torch==2.13.0 python benchmarks/torch_reference.py --impl eager|compile|bf16|compile_bf16 \
        --what train|fwd|sample|ddim [--batch 16,128] [--threads N] [--repeats R] [--warmup W]

One JSON line per (what, batch), timed as `ddpm benchmark` times ours (ddpm/benchmark.py: the same
warm-up, steps per repeat, minimum and median, and the other processes' share of the CPU) and with
its field names where they mean the same thing. `train` is one Adam step of the DDPM loss; `fwd`
one inference-mode U-Net evaluation (what `ddpm benchmark` records as "sample"); `sample` one
ancestral DDPM step; `ddim` the wall time of a whole DDIM run (`sample.steps` steps from
params.yaml) for `batch` images. The network is the tutorial's, as `ddpm benchmark`'s, unless
`--params` names a file. `--impl bf16` is PyTorch's usual CPU mixed precision: fp32 weights and
Adam, the forward under torch.autocast("cpu", dtype=torch.bfloat16), channels_last activations.
`compile` is torch.compile of the loss and the forward in fp32; `compile_bf16` the same of the
`bf16` arithmetic.

The peer our bf16 figures are compared with is PyTorch's best: at each (what, batch) the faster of
`bf16` and `compile_bf16`, measured back to back (which one wins depends on the processor, the
network and the batch, so both are run every time):

    uv run --with torch==2.13.0 python benchmarks/torch_reference.py --impl bf16 --what train,fwd
    uv run --with torch==2.13.0 python benchmarks/torch_reference.py --impl compile_bf16 --what train,fwd
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch_unet import UnetConfig, build_unet, count_parameters

log = logging.getLogger("torch_reference")

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"  # the sample section, and the model with --params
TARGET_SECONDS = 4.0  # each timed repeat runs about this long (as ddpm/benchmark.py)
MAX_STEPS = 200
POOL = 4  # distinct seeded inputs cycled through, as ddpm/benchmark.py
TUTORIAL_BETAS = (1e-4, 0.02)  # linear; the timings do not depend on the schedule's values
LR = 1e-4
DEFAULT_BATCHES = {"train": "16,128", "fwd": "64", "sample": "64", "ddim": "64"}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # what decides oneDNN's fast paths


@dataclass(frozen=True)
class Impl:
    """How one --impl runs the network: the only place that tells the impls apart."""

    compiled: bool  # torch.compile of the loss and the forward
    bf16: bool  # the forward under bf16 autocast with channels_last activations; weights and Adam stay fp32


IMPLS = {
    "eager": Impl(compiled=False, bf16=False),
    "compile": Impl(compiled=True, bf16=False),
    "bf16": Impl(compiled=False, bf16=True),
    "compile_bf16": Impl(compiled=True, bf16=True),
}


def cpu_busy_seconds() -> float:
    """Seconds of CPU time all processes have used (/proc/stat, as ddpm/benchmark.py); 0 where missing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:8]]
    except OSError:
        return 0.0
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def processor() -> dict:
    """The processor's model name and the lscpu flags that decide bf16/AMX kernels."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        log.warning("lscpu failed (%s): processor and cpu_flags not recorded", err)
        return {"processor": "unknown (lscpu failed)", "cpu_flags": []}
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    return {"processor": info.get("Model name", "unknown").strip(), "cpu_flags": [f for f in CPU_FLAGS if f in flags]}


def time_calls(fn: Callable[[int], torch.Tensor], repeats: int, warmup: int, steps: int = 0) -> dict:
    """Time `fn(i)` per call over `repeats` repeats after a first call and `warmup` more (ddpm/benchmark.py's
    method); `steps` calls per repeat, 0 = as many as fill TARGET_SECONDS."""
    started = time.perf_counter()
    out = fn(0)
    first = time.perf_counter() - started
    for i in range(warmup):
        fn(i + 1)
    if steps <= 0:
        started = time.perf_counter()
        fn(0)
        steps = max(2, min(MAX_STEPS, int(TARGET_SECONDS / max(time.perf_counter() - started, 1e-4))))
    per_call, foreign = [], []
    for _ in range(repeats):
        busy0, own0, t0 = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()
        for i in range(steps):
            out = fn(i)
        wall = time.perf_counter() - t0
        other = max(0.0, (cpu_busy_seconds() - busy0) - (own_cpu_seconds() - own0))
        per_call.append(wall / steps)
        foreign.append(round(other / (wall * (os.cpu_count() or 1)), 3))
    seconds = np.array(per_call)
    best, med = float(seconds.min()), float(np.median(seconds))
    return {
        "steps": steps,
        "repeats": repeats,
        "first_call_s": round(first, 2),
        "ms_min": round(best * 1e3, 2),
        "ms_med": round(med * 1e3, 2),
        "ms_max": round(float(seconds.max()) * 1e3, 2),
        "foreign_frac": foreign,
        "_best": best,
        "_med": med,
        "_out": out,
    }


class Reference:
    """The network, the process's arithmetic and the Adam step for one --impl."""

    def __init__(self, model: UnetConfig, timesteps: int, impl: str):
        torch.manual_seed(0)
        self.model, self.timesteps, self.impl = model, timesteps, impl
        betas = torch.linspace(*TUTORIAL_BETAS, timesteps, dtype=torch.float64)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        alphas_cumprod_prev = torch.cat((torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]))
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)  # DDPM eq. 7
        self.net = build_unet(model)
        self.params = count_parameters(self.net)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=LR)
        how = IMPLS[impl]
        self.bf16 = how.bf16
        if how.bf16:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.predict = torch.compile(self._predict) if how.compiled else self._predict
        self.loss = torch.compile(self._loss) if how.compiled else self._loss

    def _predict(self, x_t, t):
        """(B, C, H, W) float32, (B,) int64 -> predicted noise (B, C, H, W) float32."""
        if not self.bf16:
            return self.net(x_t, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net(x_t.contiguous(memory_format=torch.channels_last), t).float()

    def coef(self, a, t):
        return a[t].float().reshape(-1, 1, 1, 1)  # (T,), (B,) -> (B, 1, 1, 1)

    def _loss(self, x0, t, noise):
        """DDPM eq. 14 with the Huber distance (delta 1), as params.yaml's diffusion.loss."""
        x_t = self.coef(self.sqrt_alphas_cumprod, t) * x0 + self.coef(self.sqrt_one_minus_alphas_cumprod, t) * noise
        return F.smooth_l1_loss(self.predict(x_t, t), noise)

    def train_step(self, x0, t, noise):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x0, t, noise)
        loss.backward()
        self.optimizer.step()
        return loss

    def ddpm_step(self, x_t, t: int, noise):
        """One ancestral step x_t -> x_{t-1} (DDPM algorithm 2)."""
        tb = torch.full((x_t.shape[0],), t, dtype=torch.int64)
        a, b = self.alphas_cumprod[t], self.betas[t]
        mean = (x_t - b / (1 - a).sqrt() * self.predict(x_t, tb)) / (1 - b).sqrt()
        return mean + self.posterior_variance[t].sqrt().float() * noise

    def ddim(self, shape: tuple[int, ...], steps: int, eta: float, clip_x0: bool, seed: int = 0):
        """A whole DDIM run (Song et al., 2021, eq. 12) from pure noise, as ddpm/diffusion.py's sampler."""
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        ts = sorted({round(float(v)) for v in np.linspace(0, self.timesteps - 1, steps)}, reverse=True)
        for t, t_prev in zip(ts, [*ts[1:], -1], strict=True):
            a_t = self.alphas_cumprod[t]
            a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
            eps = self.predict(x.float(), torch.full((shape[0],), t, dtype=torch.int64)).double()
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # 1. predicted x0
            if clip_x0:
                x0 = x0.clamp(-1.0, 1.0)  # 2. clip, then re-derive the noise it implies
                eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()  # 3. eq. 16
            noise = torch.randn(shape, generator=gen, dtype=torch.float64) if eta > 0 else 0.0
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps + sigma * noise  # 4-5. eq. 12
        return x.float()


def seeded_inputs(model: UnetConfig, timesteps: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
    """POOL (x0, t, noise) batches from seed 0, drawn as ddpm/benchmark.py draws them."""
    rng = np.random.default_rng(0)
    shape = (batch, model.channels, model.image_size, model.image_size)
    return [
        (
            torch.from_numpy(rng.uniform(-1, 1, shape).astype(np.float32)),
            torch.from_numpy(rng.integers(0, timesteps, (batch,)).astype(np.int64)),
            torch.from_numpy(rng.standard_normal(shape).astype(np.float32)),
        )
        for _ in range(POOL)
    ]


def bench(ref: Reference, what: str, batch: int, args: argparse.Namespace, sample: dict) -> dict:
    """One record: the timings of `what` at `batch`."""
    pool = seeded_inputs(ref.model, ref.timesteps, batch)
    ts = [torch.full((batch,), ref.timesteps - 1 - i, dtype=torch.int64) for i in range(POOL)]
    shape = tuple(pool[0][0].shape)
    extra = {}
    if what == "train":
        ref.net.train()
        result = time_calls(lambda i: ref.train_step(*pool[i % POOL]), args.repeats, args.warmup)
        extra["loss"] = result["_out"].item()
    else:
        ref.net.eval()
        with torch.inference_mode():
            if what == "fwd":
                result = time_calls(lambda i: ref.predict(pool[i % POOL][2], ts[i % POOL]), args.repeats, args.warmup)
            elif what == "sample":
                result = time_calls(
                    lambda i: ref.ddpm_step(pool[i % POOL][2], ref.timesteps - 1 - i % POOL, pool[(i + 1) % POOL][2]),
                    args.repeats,
                    args.warmup,
                )
            else:  # one whole run per repeat; its first call is the warm-up
                result = time_calls(lambda i: ref.ddim(shape, **sample), args.repeats, warmup=0, steps=1)
                extra = {
                    "sampler": "ddim",
                    "ddim_steps": sample["steps"],
                    "eta": sample["eta"],
                    "clip_x0": sample["clip_x0"],
                    "wall_s_min": round(result["_best"], 2),
                    "wall_s_med": round(result["_med"], 2),
                }
    best, med = result.pop("_best"), result.pop("_med")
    result.pop("_out")
    evals = sample["steps"] if what == "ddim" else 1  # U-Net evaluations per timed call
    record = {
        "what": what,
        "batch": batch,
        **result,
        "img_s_best": round(batch / best, 1),
        "img_s_med": round(batch / med, 1),
    }
    if what != "train":
        record.update(evals_s_best=round(evals / best, 2), evals_s_med=round(evals / med, 2))
    return {**record, **extra}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impl", choices=list(IMPLS), default="eager")
    p.add_argument("--what", default="train", help="comma-separated: train, fwd, sample, ddim")
    p.add_argument("--batch", help=f"comma-separated batch sizes; default per --what {DEFAULT_BATCHES}")
    p.add_argument(
        "--params",
        type=Path,
        help="params file whose model and sample sections are used; default: the tutorial's network, as "
        "`ddpm benchmark` (params.yaml's is narrower), with params.yaml's sample section",
    )
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    unknown = sorted(set(args.what.split(",")) - set(DEFAULT_BATCHES))
    if unknown:
        p.error(f"--what: unknown {unknown}; choose from {sorted(DEFAULT_BATCHES)}")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = yaml.safe_load((args.params or PARAMS).read_text())
    model = UnetConfig.from_params(args.params) if args.params else UnetConfig()  # the tutorial's
    sample = {key: params["sample"][key] for key in ("steps", "eta", "clip_x0")}
    ref = Reference(model, params["diffusion"]["timesteps"], args.impl)
    settings = {
        "impl": args.impl,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        **processor(),
        "params": ref.params,
        "model": {**vars(model), "dim_mults": list(model.dim_mults)},
    }
    for what in args.what.split(","):
        for batch in (int(b) for b in (args.batch or DEFAULT_BATCHES[what]).split(",")):
            print(json.dumps({**settings, **bench(ref, what, batch, args, sample)}), flush=True)


if __name__ == "__main__":
    main()
