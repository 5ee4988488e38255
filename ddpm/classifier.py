"""The Fashion-MNIST feature network: a small CNN classifier whose penultimate features define FID.

Inception-v3 features mean little for 28x28 grayscale garments, so FID here uses a CNN trained on
the training split of the same data, fed images in the same [-1, 1] range the diffusion model
produces. It trains once: its checkpoint (weights, config, test accuracy) is reused while the
classifier config is unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import mindspore as ms
import numpy as np
import yaml
from mindspore import nn, ops

from ddpm.checkpoint import CheckpointError, read_ckpt, write_ckpt
from ddpm.config import ClassifierConfig, Config, config_from_dict
from ddpm.data import TEST_SIZE, build_dataset, steps_per_epoch, verify_dataset
from ddpm.layers import Layers, network_layers
from ddpm.logs import progress_bar
from ddpm.loop import epoch_losses, make_train_step
from ddpm.lr_schedules import cosine_decay
from ddpm.runtime import select_device

log = logging.getLogger(__name__)

NUM_CLASSES = 10
IMAGE_SIZE = 28
FORMAT_VERSION = 1
META_KEYS = ("format_version", "config_yaml", "test_accuracy")

# (B, 1, 28, 28) float32 in [-1, 1] -> features (B, F), logits (B, 10), both float32 numpy
Forward = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class FashionClassifier(nn.Cell):
    """Conv blocks -> dense `features` + ReLU (the FID features) -> dense logits over the 10 classes."""

    def __init__(self, channels: tuple[int, ...], features: int):
        super().__init__()
        layers = network_layers("fp32")  # ddpm/kernels' conv and max-pool on the CPU
        blocks, c_in, size = [], 1, IMAGE_SIZE
        for c_out in channels:
            blocks += [_conv_bn_relu(layers, c_in, c_out), layers.max_pool2x2()]
            c_in, size = c_out, size // 2
        self.body = nn.SequentialCell(blocks)
        self.flatten = nn.Flatten()
        self.embed = nn.SequentialCell(nn.Dense(c_in * size * size, features), nn.ReLU())
        self.head = nn.Dense(features, NUM_CLASSES)

    def construct(self, x):
        h = self.flatten(self.body(x))  # (B, 1, 28, 28) -> (B, C, s, s) -> (B, C*s*s)
        features = self.embed(h)  # (B, F)
        return features, self.head(features)  # (B, F), (B, 10)


def _conv_bn_relu(layers: Layers, c_in: int, c_out: int) -> nn.SequentialCell:
    # The layer factory's conv: above the AVX2 cap MindSpore's own conv is ~11x slower here.
    conv = layers.conv2d(c_in, c_out, 3, padding=1)
    return nn.SequentialCell(conv, nn.BatchNorm2d(c_out), nn.ReLU())


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
    """A trained classifier ready for inference, with what its checkpoint says about it."""

    config: ClassifierConfig
    test_accuracy: float
    forward: Forward

    def embed(self, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(N, 1, 28, 28) in [-1, 1] -> features (N, F) and class probabilities (N, 10), float64."""
        outputs = [self.forward(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        features = np.concatenate([f for f, _ in outputs]).astype(np.float64)
        return features, softmax(np.concatenate([logits for _, logits in outputs]).astype(np.float64))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def make_forward(net: FashionClassifier) -> Forward:
    """A jitted inference-mode forward of `net` on numpy inputs."""
    net.set_train(False)

    @ms.jit
    def forward(x):
        return net(x)

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features, logits = forward(ms.Tensor(x, ms.float32))
        return features.asnumpy(), logits.asnumpy()

    return run


def train_classifier(config: Config, progress: bool = True) -> FeatureNetwork:
    """Train on the training split, measure accuracy on the whole test split, write the checkpoint."""
    c = config.classifier
    select_device(config.train.device)
    verify_dataset(config.data.root)
    ms.set_seed(c.seed)  # weight init
    net = FashionClassifier(c.channels, c.features)
    steps = steps_per_epoch(c.limit, c.batch_size)
    lr = cosine_decay(c.lr, 0.0, steps * c.epochs).astype(np.float32)
    optimizer = nn.Adam(net.trainable_params(), learning_rate=ms.Tensor(lr))

    def loss_fn(x, labels):
        _, logits = net(x)
        return ops.cross_entropy(logits, labels)

    train_step = make_train_step(loss_fn, optimizer)

    def step(x: ms.Tensor, labels: ms.Tensor) -> float:
        return float(train_step(x, labels).asnumpy())

    started = time.perf_counter()
    for epoch in range(c.epochs):
        net.set_train(True)
        dataset = build_dataset(
            config.data.root,
            c.batch_size,
            c.seed,
            epoch,
            c.limit,
            flip=False,
            num_workers=config.data.num_workers,
            labels=True,
        )
        losses = list(
            epoch_losses(
                dataset.create_tuple_iterator(num_epochs=1),
                step,
                epoch=epoch,
                epochs=c.epochs,
                steps=steps,
                global_step=epoch * steps,
                name="classifier",
                fix=f"lower classifier.lr (now {c.lr})",
                progress=progress,
                batch_size=c.batch_size,
            )
        )
        log.info("classifier epoch %d/%d: loss %.4f", epoch + 1, c.epochs, np.mean(losses))
    seconds = time.perf_counter() - started
    network = FeatureNetwork(c, 0.0, make_forward(net))
    accuracy = test_accuracy(network, config.data.root, c.batch_size, progress)
    log.info("classifier trained in %.0f s: test accuracy %.4f", seconds, accuracy)
    save_classifier(c.checkpoint, net, c, accuracy)
    return dataclasses.replace(network, test_accuracy=accuracy)


def embed_split(
    network: FeatureNetwork,
    root: str,
    usage: str,
    num: int,
    batch_size: int,
    flip: bool = False,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, class probabilities and labels of the first `num` images of a split, each flipped
    with probability 1/2 (seeded) if `flip`."""
    dataset = build_dataset(
        root, batch_size, seed=0, epoch=0, limit=num, flip=flip, usage=usage, labels=True, drop_remainder=False
    )
    batches = progress_bar(
        dataset.create_tuple_iterator(output_numpy=True, num_epochs=1),
        total=math.ceil(num / batch_size),
        desc=f"classifier features ({usage})",
        unit="batch",
        images_per_unit=batch_size,
        leave=False,
        enabled=progress,
    )
    outputs = [(*network.embed(x, batch_size), labels) for x, labels in batches]
    return tuple(np.concatenate([o[i] for o in outputs]) for i in range(3))


def test_accuracy(network: FeatureNetwork, root: str, batch_size: int, progress: bool = False) -> float:
    _, probs, labels = embed_split(network, root, "test", TEST_SIZE, batch_size, progress=progress)
    return float(np.mean(probs.argmax(axis=1) == labels))


def save_classifier(path: str | Path, net: FashionClassifier, config: ClassifierConfig, accuracy: float) -> Path:
    """Write the weights with the config and test accuracy beside them, atomically, CRC-checked."""
    meta = {
        "format_version": FORMAT_VERSION,
        "config_yaml": yaml.safe_dump({"classifier": _plain(config)}),
        "test_accuracy": repr(accuracy),
    }  # a string: numbers come back as float32
    path = write_ckpt(path, net, meta)
    log.info("saved %s", path)
    return path


def load_classifier(path: str | Path, device: str = "auto") -> FeatureNetwork:
    """Rebuild the network from the checkpoint's own config; a damaged file is a CheckpointError."""
    select_device(device)
    config, accuracy, params = _read(Path(path))
    net = FashionClassifier(config.channels, config.features)
    not_loaded, _ = ms.load_param_into_net(net, params, strict_load=True)
    if not_loaded:
        raise CheckpointError(f"{path} lacks weights for {not_loaded[:3]}")
    return FeatureNetwork(config, accuracy, make_forward(net))


def trained_classifier(config: ClassifierConfig) -> FeatureNetwork | None:
    """The classifier at config.checkpoint if it was trained with these settings, else None."""
    path = Path(config.checkpoint)
    if not path.is_file():
        return None
    saved, _, _ = _read(path)
    if dataclasses.replace(saved, checkpoint=config.checkpoint) != config:
        log.info("%s was trained with other settings; it will be retrained", path)
        return None
    return load_classifier(path)


def _read(path: Path) -> tuple[ClassifierConfig, float, dict]:
    if not path.is_file():
        raise CheckpointError(
            f"classifier checkpoint not found: {path}; train it with `ddpm classifier` (or `dvc repro classifier`)"
        )
    meta, params = read_ckpt(path, META_KEYS, FORMAT_VERSION, "delete it and retrain")
    config = config_from_dict(yaml.safe_load(meta["config_yaml"])).classifier
    return config, float(meta["test_accuracy"]), params


def _plain(config: ClassifierConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
