"""Datasets, loaded once into memory as uint8 tensors (N x C x H x W) with int64 labels.

No per-sample PIL transforms: batches are sliced from the tensors and scaled to [0, 1]
on the fly; CIFAR-10's crop-and-flip augmentation runs on whole batches.
"""
from __future__ import annotations

import gzip
import os
import zipfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .run_config import RunConfig


class DataError(ConfigError):
    """The data asked for cannot be loaded or is malformed (one-line message)."""


@dataclass
class ImageData:
    x_train: torch.Tensor  # uint8, N x C x H x W
    y_train: torch.Tensor  # int64, N
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: bool = False  # CIFAR-style random crop + flip while training
    x_val: Optional[torch.Tensor] = None  # held out of the training data to choose the best models
    y_val: Optional[torch.Tensor] = None

    @property
    def shape(self) -> tuple:
        """(channels, height, width) of one image."""
        return tuple(self.x_train.shape[1:])


def from_arrays(x_train, y_train, x_test, y_test, source: str, num_classes: Optional[int] = None,
                augment: bool = False) -> ImageData:
    """Validate arrays in torchvision's `.data`/`.targets` layout and convert them.

    Images: uint8, N x H x W (grey) or N x H x W x C. Labels: integers 0..C-1.
    """
    arrays = {"x_train": np.asarray(x_train), "y_train": np.asarray(y_train),
              "x_test": np.asarray(x_test), "y_test": np.asarray(y_test)}
    for key in ("x_train", "x_test"):
        a = arrays[key]
        if a.dtype != np.uint8:
            raise DataError(f"{source}: {key} must be uint8 pixels 0..255, got dtype {a.dtype}")
        if a.ndim not in (3, 4):
            raise DataError(f"{source}: {key} must be N x H x W or N x H x W x C, got shape {a.shape}")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(f"{source}: x_train images are {arrays['x_train'].shape[1:]} but x_test images are "
                        f"{arrays['x_test'].shape[1:]}")
    for key in ("y_train", "y_test"):
        a = arrays[key]
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{source}: {key} must be a 1-D integer array, got dtype {a.dtype} shape {a.shape}")
    for split in ("train", "test"):
        nx, ny = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if nx != ny:
            raise DataError(f"{source}: x_{split} has {nx} images but y_{split} has {ny} labels")
        if nx == 0:
            raise DataError(f"{source}: x_{split} is empty")
    if num_classes is None:  # the classes are the ones training shows: 0..C-1, each at least once
        check_labels_cover_classes(arrays["y_train"], arrays["y_test"], source)
        num_classes = int(arrays["y_train"].max()) + 1
    for key in ("y_train", "y_test"):
        lo, hi = int(arrays[key].min()), int(arrays[key].max())
        if lo < 0 or hi >= num_classes:
            raise DataError(f"{source}: {key} has labels in [{lo}, {hi}]; labels must be 0..{num_classes - 1}")
    if num_classes < 2:
        raise DataError(f"{source}: labels must cover at least 2 classes")

    def images(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()

    return ImageData(
        x_train=images(arrays["x_train"]), y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        x_test=images(arrays["x_test"]), y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        num_classes=num_classes, augment=augment,
    )


def check_labels_cover_classes(y_train: np.ndarray, y_test: np.ndarray, source: str) -> None:
    """Training labels must be exactly 0..C-1 (every class seen in training), and every test
    label a class that training has: else a 110-class model trains silently on labels
    100..109, or the test set scores a class no client can learn."""
    present = np.unique(y_train)
    if present[0] != 0 or present[-1] != len(present) - 1:
        if present[0] == 0:  # a gap: the first few classes with no training image
            gaps = [c for c in range(int(present[-1]) + 1) if c not in set(present.tolist())][:5] \
                if present[-1] < 100_000 else []
            detail = f"class(es) {', '.join(map(str, gaps))} have no training image" if gaps else "there are gaps"
        else:
            detail = f"the smallest is {present[0]}"
        raise DataError(f"{source}: y_train labels must be 0..C-1 with every class present; found {len(present)} "
                        f"distinct labels in [{present[0]}, {present[-1]}] ({detail}); relabel them to "
                        f"0..{len(present) - 1}")
    unseen = np.setdiff1d(np.unique(y_test), present)
    if len(unseen):
        raise DataError(f"{source}: y_test has label(s) {', '.join(map(str, unseen[:5].tolist()))} that no training "
                        f"image has (training labels are 0..{present[-1]})")


def hold_out_validation(data: ImageData, fraction: float, seed: int) -> ImageData:
    """The same data with round(fraction * N) training images (at least one), drawn with
    `seed`, moved into a validation set. Done before partitioning, identically on the
    driver and on any node that loads its own copy. fraction 0: unchanged."""
    if fraction <= 0:
        return data
    n = len(data.y_train)
    n_val = max(1, int(round(fraction * n)))
    if n - n_val < 2:
        raise DataError(f"--val-fraction {fraction:g} of {n} training images leaves {n - n_val} to train on; "
                        "use more data or --val-fraction 0")
    order = torch.from_numpy(np.random.default_rng([int(seed), 0x7A1]).permutation(n))
    val, train = order[:n_val].sort().values, order[n_val:].sort().values
    return ImageData(data.x_train[train], data.y_train[train], data.x_test, data.y_test, data.num_classes,
                     data.augment, x_val=data.x_train[val], y_val=data.y_train[val])


DIGEST_SAMPLE = 1 << 16  # image bytes hashed per array: a fixed, cheap cost whatever the dataset's size


def data_digest(data: ImageData) -> str:
    """A short fingerprint of the training and test sets, to check that every node holds the
    same data (--data-on nodes): the shapes, every label, and an evenly strided sample of
    the image bytes (an odd stride, so that it does not fall on the same pixel of each image)."""
    import hashlib

    h = hashlib.sha256()
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test), (data.x_val, data.y_val)):
        if x is None:
            h.update(b"none")
            continue
        flat = x.reshape(-1)
        stride = max(1, flat.numel() // DIGEST_SAMPLE) | 1
        h.update(repr(tuple(x.shape)).encode())
        h.update(np.ascontiguousarray(flat[::stride].numpy()).tobytes())
        h.update(np.ascontiguousarray(np.asarray(y, dtype=np.int64)).tobytes())
    return h.hexdigest()[:16]


def load_npz(path: str) -> ImageData:
    keys = ("x_train", "y_train", "x_test", "y_test")
    if not os.path.isfile(path):
        raise DataError(f"--data-file {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)}; an npz needs {', '.join(keys)} "
                                f"(found: {', '.join(z.files) or 'none'})")
            arrays = [z[k] for k in keys]
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    return from_arrays(*arrays, source=path)


def _digits_arrays():
    """(images N x 8 x 8 in 0..16, labels) of scikit-learn's bundled digits. Read straight from
    the file scikit-learn ships: importing sklearn (and scipy) costs seconds of start-up."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else ""
    if not os.path.isfile(path):  # an unusual install: let scikit-learn find it
        from sklearn.datasets import load_digits as sk_load_digits

        bunch = sk_load_digits()
        return bunch.images, bunch.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def load_digits() -> ImageData:
    """scikit-learn's bundled 8x8 digits (1797 images, no download); fixed 80/20 split."""
    raw_images, raw_labels = _digits_arrays()
    images = np.rint(raw_images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    labels = np.asarray(raw_labels).astype(np.int64)
    order = np.random.RandomState(0).permutation(len(labels))  # fixed: the split never moves
    n_test = len(labels) // 5
    test, train = order[:n_test], order[n_test:]
    return from_arrays(images[train], labels[train], images[test], labels[test], source="digits", num_classes=10)


_TORCHVISION = {
    # name: (torchvision class name, files torchvision expects under --data-dir)
    "mnist": ("MNIST", "MNIST/raw/ with train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                       "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"),
    "fmnist": ("FashionMNIST", "FashionMNIST/raw/ with train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                               "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py/ with data_batch_1 .. data_batch_5, test_batch, batches.meta"),
}


def load_torchvision(name: str, data_dir: str, download: bool) -> ImageData:
    import torchvision

    cls_name, expected = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        train = cls(root=data_dir, train=True, download=download)
        test = cls(root=data_dir, train=False, download=download)
    except RuntimeError as e:
        if download:
            raise DataError(f"{name}: download into {os.path.abspath(data_dir)} failed ({e})") from None
        raise DataError(f"{name}: not found in {os.path.abspath(data_dir)} (expected {expected}); "
                        f"pass --download to fetch it, or --data-dir DIR where it already is") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read or fetch it in {os.path.abspath(data_dir)} ({e})") from None

    def as_numpy(a):
        return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)

    return from_arrays(as_numpy(train.data), as_numpy(train.targets), as_numpy(test.data),
                       as_numpy(test.targets), source=name, num_classes=10, augment=(name == "cifar10"))


def load_dataset(cfg: RunConfig) -> ImageData:
    if cfg.dataset == "digits":
        return load_digits()
    if cfg.dataset == "npz":
        data = load_npz(cfg.data_file)
        # An npz copy of CIFAR-10 (--preset cifar10) takes CIFAR-10's crop-and-flip too.
        data.augment = cfg.preset == "cifar10"
        return data
    return load_torchvision(cfg.dataset, cfg.data_dir, cfg.download)


def read_idx_gz(path: str) -> np.ndarray:
    """Read an MNIST-format idx file (gzip), e.g. t10k-images-idx3-ubyte.gz."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to float32 in [0, 1], on whichever device the pixels are."""
    return x_uint8.float().div_(255.0)


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, for a whole batch at once.
    It runs on x's device; the offsets and flips come from the CPU `generator`, so the same
    seed gives the same crops on any device."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].to(x.device)  # b x h x 1
    cols = (dx[:, None] + torch.arange(w))[:, None, :].to(x.device)  # b x 1 x w
    batch_idx = torch.arange(b, device=x.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[batch_idx, rows, cols]  # b x h x w x c
    cropped = cropped.permute(0, 3, 1, 2)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped).contiguous()
