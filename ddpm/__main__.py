"""The `ddpm` command: train, sample, classifier, evaluate, posthoc-ema, benchmark, fetch-data. Each
parses, loads config, calls one function."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import typing
from pathlib import Path

from ddpm.config import Device, Sampler
from ddpm.data import DEBIAN_DATASET_DIR
from ddpm.logs import configure_logging

log = logging.getLogger("ddpm")


def train(args: argparse.Namespace) -> None:
    from ddpm.config import load_config, parse_sets
    from ddpm.distributed import in_msrun, init_world, launch_workers
    from ddpm.train import fit

    config = load_config(args.params, parse_sets(args.set))
    world = init_world(config.train.device)  # before any side effect: msrun's scheduler runs this command too
    if config.train.workers > 1 and not in_msrun():
        command = ["-m", "ddpm", "train", *(["--resume"] if args.resume else [])]
        launch_workers(config, command, Path(config.train.checkpoint_dir))  # each worker: --params <this config>
        return
    result = fit(config, resume=args.resume)
    if world.is_main:
        log.info("trained %d epochs (%d steps); checkpoint %s", result.epochs, result.global_step, result.checkpoint)


def sample(args: argparse.Namespace) -> None:
    import dataclasses

    from ddpm.arrays import write_arrays
    from ddpm.checkpoint_sampler import load_sampler
    from ddpm.images import save_grid

    sampler = load_sampler(args.checkpoint, device=args.device, use_ema=not args.raw_weights)
    request = sampler.request(args.num, args.seed, args.sampler, args.steps, args.eta)  # before any sampling
    if args.batch_size is not None:
        sampler = sampler.with_batch_size(args.batch_size)
    if args.out.suffix == ".png":
        path = save_grid(sampler.sample(request, progress=True), args.out)
    else:
        m = sampler.config.model
        settings = {
            **dataclasses.asdict(request),
            "batch_size": sampler.config.sample.batch_size,  # seeds per batch
            "checkpoint": str(args.checkpoint),
            "weights": "raw" if args.raw_weights else "ema",
        }
        path = write_arrays(
            args.out,
            sampler.batches(request, progress=True),
            (request.num, m.channels, m.image_size, m.image_size),
            settings,
        )
    log.info("wrote %s (%d images, %s)", path, request.num, request)


def sample_output(value: str) -> Path:
    """--out: a PNG grid, or a .npy/.npz array of every image."""
    path = Path(value)
    if path.suffix not in (".png", ".npy", ".npz"):
        raise argparse.ArgumentTypeError(f"{value!r}: end it in .png (a grid), .npy or .npz (arrays)")
    return path


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}")
    return int(value)


def positive_ints(value: str) -> tuple[int, ...]:
    """A comma-separated list of integers >= 1, e.g. --train-batch 16,128."""
    try:
        return tuple(positive_int(item.strip()) for item in value.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be integers >= 1 separated by commas, got {value!r}") from None


def classifier(args: argparse.Namespace) -> None:
    from ddpm.classifier import train_classifier
    from ddpm.config import load_config, parse_sets

    network = train_classifier(load_config(args.params, parse_sets(args.set)))
    log.info("classifier test accuracy %.4f; checkpoint %s", network.test_accuracy, network.config.checkpoint)


def evaluate(args: argparse.Namespace) -> None:
    from ddpm.config import load_config, parse_sets
    from ddpm.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        args.checkpoint, load_config(args.params, parse_sets(args.set)), use_ema=not args.raw_weights
    )
    sys.stdout.write(json.dumps(metrics) + "\n")


def posthoc_ema(args: argparse.Namespace) -> None:
    from ddpm.config import load_config, parse_sets
    from ddpm.posthoc_ema import choose

    choice = choose(args.checkpoint, args.sigma_rel, load_config(args.params, parse_sets(args.set)), progress=True)
    losses = {f"{sigma_rel:.3f}": loss for sigma_rel, loss in choice.losses.items()}
    record = {"checkpoint": str(choice.checkpoint), "sigma_rel": choice.sigma_rel, "ema_loss": choice.ema_loss}
    sys.stdout.write(json.dumps({**record, "losses": losses}) + "\n")


def sigma_rels(value: str) -> tuple[float, ...]:
    """--sigma-rel: comma-separated lengths in (0, MAX_SIGMA_REL]."""
    from ddpm.config import MAX_SIGMA_REL, is_posthoc_length

    try:
        lengths = tuple(float(item) for item in value.split(","))
    except ValueError:
        lengths = ()
    if not lengths or not all(map(is_posthoc_length, lengths)):
        raise argparse.ArgumentTypeError(f"must be numbers in (0, {MAX_SIGMA_REL}] separated by commas, got {value!r}")
    return lengths


def benchmark(args: argparse.Namespace) -> None:
    from ddpm.benchmark import run_benchmark
    from ddpm.config import load_config, parse_sets

    config = load_config(args.params, parse_sets(args.set))
    for record in run_benchmark(config, args.train_batch, args.sample_batch, args.repeats):
        sys.stdout.write(json.dumps(record) + "\n")


def fetch_data(args: argparse.Namespace) -> None:
    from ddpm.data import install_dataset, verify_dataset

    install_dataset(args.source, args.root)
    verify_dataset(args.root)
    log.info("Fashion-MNIST verified in %s", args.root)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default, unless it is a flag, has none or the help already names it;
    descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with HelpFormatter; its subcommands' parsers are Parsers too (argparse's default)."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ddpm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="`ddpm COMMAND --help` shows its options"
    )

    p = sub.add_parser("train", help="train (or resume) from params.yaml")
    p.add_argument("--params", default="params.yaml", help="the settings file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.epochs=2")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint (mid-epoch ones too)")
    p.set_defaults(func=train)

    p = sub.add_parser("sample", help="draw images from a checkpoint: a PNG grid, or .npy/.npz arrays")
    p.add_argument("--checkpoint", required=True, help="a .ckpt written by `ddpm train`")
    p.add_argument("--num", type=int, default=64, help="images, >= 1 (.npy/.npz: any number, in batches)")
    p.add_argument("--sampler", choices=typing.get_args(Sampler), default=None, help="default: the checkpoint's config")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="DDIM steps in [1, T] (default: the checkpoint's config); ddpm walks all T",
    )
    p.add_argument("--eta", type=float, default=None, help="DDIM noise in [0, 1] (default: the checkpoint's config)")
    p.add_argument("--seed", type=int, default=0, help="in [0, 2**63 - 1]")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="images per batch (default: the checkpoint's sample.batch_size)",
    )
    p.add_argument(
        "--device", choices=typing.get_args(Device), default="auto", help="auto: the GPU if MindSpore can use one"
    )
    p.add_argument("--raw-weights", action="store_true", help="sample with the raw weights, not the EMA")
    p.add_argument(
        "--out",
        type=sample_output,
        default=Path("samples.png"),
        help=".png: a grid; .npy/.npz: float32 images in [-1, 1], shape (num, 1, 28, 28), the .npz with the settings",
    )
    p.set_defaults(func=sample)

    p = sub.add_parser("classifier", help="train the Fashion-MNIST classifier whose features define FID")
    p.add_argument("--params", default="params.yaml", help="the settings file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. classifier.epochs=2")
    p.set_defaults(func=classifier)

    p = sub.add_parser("evaluate", help="denoising loss, FID (with its floor) and class coverage as JSON")
    p.add_argument("--checkpoint", required=True, help="a .ckpt written by `ddpm train`")
    p.add_argument("--params", default="params.yaml", help="the evaluate, sample and classifier sections")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. evaluate.fid_samples=500"
    )
    p.add_argument("--raw-weights", action="store_true", help="score the raw weights, not the EMA")
    p.set_defaults(func=evaluate)

    p = sub.add_parser(
        "posthoc-ema",
        help="average the weights over a length chosen after training (train.posthoc_ema's snapshots)",
        description="Write, for each --sigma-rel, the power-function average of the weights ending at the\n"
        "checkpoint's step, rebuilt from the post-hoc EMA snapshots beside it, as a checkpoint that\n"
        "`ddpm evaluate` and `ddpm sample` read: <dir>/posthoc/<checkpoint>_sigma_<length>.ckpt.\n"
        "Beside an EMA, the raw weights too, as length 0 (_sigma_0.000.ckpt). Then score each, and\n"
        "the checkpoint's own weights, by the held-out denoising loss (the evaluate section's\n"
        "images, timesteps and seed) and print JSON: the lowest one's checkpoint and sigma_rel\n"
        "(null: the checkpoint's own), the checkpoint's loss (ema_loss) and each length's.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a .ckpt written by `ddpm train` with train.posthoc_ema set: where the average ends",
    )
    p.add_argument(
        "--sigma-rel",
        type=sigma_rels,
        required=True,
        help="lengths, comma-separated: the standard deviation of its weighting over the steps, relative to them",
    )
    p.add_argument("--params", default="params.yaml", help="the evaluate section: how the averages are scored")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. evaluate.num_images=200"
    )
    p.set_defaults(func=posthoc_ema)

    p = sub.add_parser("benchmark", help="training and sampling throughput as JSON lines")
    p.add_argument("--params", default=None, help="default: the built-in (tutorial) model")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. model.dim=8")
    # a string default: argparse parses it with `type` as it parses the user's
    p.add_argument(
        "--train-batch", type=positive_ints, default="16,128", help="training batch sizes to time, comma-separated"
    )
    p.add_argument("--sample-batch", type=positive_int, default=64, help="images per sampling batch to time")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats of each measurement")
    p.set_defaults(func=benchmark)

    p = sub.add_parser("fetch-data", help="install and verify the Fashion-MNIST IDX files")
    p.add_argument("--source", default=DEBIAN_DATASET_DIR, help="directory or base URL of the .gz files")
    p.add_argument("--root", default="data/fashion-mnist", help="where the files go (data.root)")
    p.set_defaults(func=fetch_data)
    return parser


def resume_hint(args: argparse.Namespace) -> str:
    """What continues a training stopped by a signal: the same `ddpm train` with --resume."""
    if args.func is not train:
        return "rerun to continue"
    resume = ["ddpm", "train", "--params", args.params, *(f"--set={s}" for s in args.set), "--resume"]
    return f"continue with `{shlex.join(resume)}`"


def main(argv: list[str] | None = None) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ddpm.errors import run_entry_point

    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)

    def body() -> int:
        with logging_redirect_tqdm():
            args.func(args)
        return 0

    return run_entry_point(body, log, resume=resume_hint(args))


if __name__ == "__main__":
    sys.exit(main())
