"""
Fashion-MNIST (Xiao et al. 2017, arXiv 1708.07747, MIT licence): 70,000 grey 28x28 photos of
clothing in 10 classes, 60,000 for training and 10,000 for testing, read straight from the four
IDX files of the official distribution (gzipped or not). data/fashion_mnist/prepare.py puts
them in place. Every image is padded with 2 black pixels a side to 32x32 (the toy preset's size;
the background is already black, so nothing is resampled) and repeated over 3 channels.

IDX (http://yann.lecun.com/exdb/mnist/): a big-endian header of two zero bytes, a type byte
(0x08: uint8), the number of dimensions and one uint32 per dimension, then the data, row-major.
"""

import functools
import gzip
import math
import os

import numpy as np
import torch

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {  # split -> (images, labels), the official names; the held-out split is the test set
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
PAD = 2  # 28 + 2 * 2 = 32


def idx_path(root, name):
    """ROOT/NAME.gz or ROOT/NAME, whichever exists (None if neither)."""
    for path in (os.path.join(root, name + ".gz"), os.path.join(root, name)):
        if os.path.isfile(path):
            return path
    return None


def read_idx(path, ndim):
    """An IDX file of uint8 with ndim dimensions (gzipped or not) -> numpy array. ValueError naming the
    file if it is not one (wrong magic number, wrong rank) or its length is not what its header says.
    Kept in memory per (path, mtime): every stage builds its datasets again."""
    return _read_idx(path, ndim, os.path.getmtime(path))


@functools.lru_cache(maxsize=4)
def _read_idx(path, ndim, mtime):
    try:
        data = open(path, "rb").read()
        if data[:2] == b"\x1f\x8b":  # gzip's magic, whatever the file is called
            data = gzip.decompress(data)
    except (OSError, EOFError) as e:  # gzip: a truncated or damaged file
        raise ValueError(f"{path}: not a readable IDX file ({e}); run python data/fashion_mnist/prepare.py again") from None
    magic = data[:4]
    if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] != ndim:
        raise ValueError(f"{path}: not an IDX file of {ndim}-d uint8 (magic {magic.hex() or 'missing'}, expected "
                         f"00000{800 + ndim}); run python data/fashion_mnist/prepare.py again")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4)) if len(data) >= 4 + 4 * ndim else None
    body = data[4 + 4 * ndim:]
    if shape is None or len(body) != math.prod(shape):
        raise ValueError(f"{path}: {len(body)} bytes of data where its header says {shape}: truncated or "
                         "corrupt; run python data/fashion_mnist/prepare.py again")
    return np.frombuffer(body, np.uint8).reshape(shape)


def missing_files(root):
    """The official file names not found in root (gzipped or not)."""
    return [n for names in FILES.values() for n in names if idx_path(root, n) is None]


class FashionMNIST(torch.utils.data.Dataset):
    """A split ('train' or 'val' = the test set) of Fashion-MNIST in ROOT, as (image (3, 32, 32) in
    [-1, 1], class). No augmentation: the photos are centred and aligned (every shoe points left),
    and the toy teacher underfits them. ValueError if a file is missing or damaged, or if images and
    labels disagree."""

    classes = CLASSES
    num_classes = len(CLASSES)

    def __init__(self, root, split):
        missing = missing_files(root)
        if missing:
            raise ValueError(f"{root} lacks {', '.join(missing)} (.gz or not); run python data/fashion_mnist/prepare.py")
        image_file, label_file = (idx_path(root, n) for n in FILES[split])
        self.images, self.labels = read_idx(image_file, 3), read_idx(label_file, 1)  # (N, 28, 28), (N,)
        if len(self.images) != len(self.labels) or self.images.shape[1:] != (28, 28):
            raise ValueError(f"{image_file} holds {self.images.shape} images and {label_file} {len(self.labels)} "
                             "labels; expected (N, 28, 28) and N")
        if self.labels.max(initial=0) >= self.num_classes:
            raise ValueError(f"{label_file}: label {self.labels.max()} is not one of the {self.num_classes} classes")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = torch.from_numpy(np.pad(self.images[i], PAD)).float() / 127.5 - 1  # (32, 32) in [-1, 1]
        return x.expand(3, -1, -1).contiguous(), int(self.labels[i])
