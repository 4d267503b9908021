"""
Data for every script: dataset selection (make_dataset), batches for training and evaluation,
and the GPT's dataset of tokenized images. The datasets themselves live in
data/shapes.py (synthetic), data/fashion_mnist.py (IDX files) and data/folders.py (ImageFolder
layout); each data/<name>/ folder holds that dataset's notes and prepare.py.
"""

import os

import numpy as np
import torch

from data.fashion_mnist import FashionMNIST, missing_files
from data.folders import FolderDataset
from data.shapes import ShapesDataset

DATASETS = ["shapes", "fashion-mnist", "folder", "imagenet", "cifar10"]
ROOT = os.path.dirname(os.path.abspath(__file__))
EVAL_IMAGES = 1024  # held-out images per evaluation


def resolve_data_path(name, data_path):
    """--data-path of a dataset (default data/cifar10 and data/fashion_mnist, where their prepare.py
    writes); ValueError if the files are not there."""
    if name in ("cifar10", "fashion-mnist") and data_path is None:
        data_path = os.path.join(ROOT, name.replace("-", "_"))
    missing = missing_files(data_path) if name == "fashion-mnist" else []
    if missing:
        raise ValueError(f"--dataset fashion-mnist: {data_path} lacks {', '.join(missing)}; "
                         "run python data/fashion_mnist/prepare.py (or give --data-path DIR with the four IDX files)")
    if name not in ("shapes", "fashion-mnist") and not os.path.isdir(os.path.join(data_path or "", "train")):
        fix = "run python data/cifar10/prepare.py" if name == "cifar10" else "see data/imagenet/README.md"
        raise ValueError(f"--dataset {name} needs --data-path DIR with DIR/train/<class>/<image>; "
                         f"got {data_path!r} ({fix})")
    return data_path


def describe(name, data_path, image_size, seed=0, eval_images=EVAL_IMAGES, cache_dir="."):
    """One line on a dataset: the images found in each split (a folder scan drops or adds nothing
    unsaid), of which an evaluation reads eval_images held-out ones."""
    train = make_dataset(name, data_path, "train", image_size, 2**62, seed, cache_dir=cache_dir)  # 2**62: all of them
    if name == "shapes":
        return f"data: shapes, rendered on the fly, {train.num_classes} classes"
    val = make_dataset(name, data_path, "val", image_size, 2**62, seed, cache_dir=cache_dir)
    return (f"data: {data_path}: {len(train):,} training images in {train.num_classes} classes, "
            f"{len(val):,} held-out images (each evaluation reads {min(len(val), eval_images):,})")


def spread(dataset, n):
    """At most n items spread evenly over a dataset (a folder's list is sorted by class, so every
    class is in; shuffled files such as Fashion-MNIST's give classes balanced on average)."""
    if n is None or n >= len(dataset):
        return dataset
    subset = torch.utils.data.Subset(dataset, np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist())
    subset.num_classes, subset.classes = dataset.num_classes, dataset.classes
    return subset


def make_dataset(name, data_path, split, image_size, size=None, seed=0, augment=None, cache_dir="."):
    """The 'train' or 'val' split of a dataset, items (image (3, S, S) in [-1, 1], class). size: shapes
    renders exactly that many (default: 1,000,000 train images, effectively endless, and EVAL_IMAGES
    held-out ones); Fashion-MNIST and folder splits are thinned evenly to at most size (default: all
    train images, EVAL_IMAGES held-out ones). augment: a folder's random crops and flips (default: split
    == 'train'); cache_dir keeps a folder's scan."""
    size = size or (EVAL_IMAGES if split == "val" else None)
    if name == "shapes":
        return ShapesDataset(size or 1_000_000, image_size, seed, split)
    if name == "fashion-mnist":
        if image_size != 32:
            raise ValueError(f"fashion-mnist images are 32 px (28 px padded), not the model's {image_size}: "
                             "use --preset toy")
        return spread(FashionMNIST(data_path, split), size)
    augment = split == "train" if augment is None else augment
    root = os.path.join(data_path, split)
    if split == "val" and not os.path.isdir(root):
        root = os.path.join(data_path, "test")  # CIFAR-10 calls its held-out split test
    return spread(FolderDataset(root, image_size, augment, cache_dir), size)


def eval_loader(dataset, batch_size):
    """A held-out split in order. Its own generator: evaluating must not draw from the global RNG
    that training uses (scale drop, class drop), or the eval interval would change the training run."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, generator=torch.Generator())


class TokenDataset(torch.utils.data.Dataset):
    """Tokenized images: ids (N, L) uint16 or int32 (a NumPy array or memory map) and labels (N,).
    Items are (ids (L,) long, class)."""

    def __init__(self, ids, labels):
        self.ids, self.labels = ids, labels

    def __len__(self):
        return len(self.ids)

    def __getitems__(self, indices):
        ids = torch.from_numpy(self.ids[indices].astype(np.int64))
        return list(zip(ids, torch.from_numpy(self.labels[indices].astype(np.int64))))

    def __getitem__(self, i):
        return self.__getitems__([i])[0]


def unreadable(data):
    """Files a folder dataset has skipped so far (0 for other datasets)."""
    while isinstance(data, torch.utils.data.Subset):
        data = data.dataset
    return data.unreadable.value if hasattr(data, "unreadable") else 0


def device_batches(data, micro_batch, seed, rank=0, world_size=1, device="cpu", num_workers=0, overfit=False,
                   start=0, log=print):
    """Endless iterator of this rank's micro-batches (x (b, 3, S, S), y (b,)) on the device, from
    micro-batch `start` on. Epoch e is a permutation seeded by (seed, e), dealt over ranks as
    DistributedSampler does; a resumed run therefore sees the images the uninterrupted run would,
    in the same order. Their augmentation resumes exactly with num_workers 0 (the main process's
    random state is in the checkpoint); worker processes reseed at each epoch's start. overfit:
    the first batch, over and over (a debugging aid). log(text) reports skipped unreadable files."""
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                                  drop_last=True)
    per_epoch = len(sampler) // micro_batch
    if per_epoch == 0:
        raise ValueError(f"{len(data)} training items are fewer than one batch ({micro_batch} per rank x "
                         f"{world_size} ranks); lower --batch-size or add data")
    epoch, skip = divmod(start, per_epoch)
    fixed, seen_unreadable = None, unreadable(data)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)[skip * micro_batch: per_epoch * micro_batch]
        workers = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank, epoch])
                                                    .generate_state(1)[0]))  # augmentation seeds of workers
        loader = torch.utils.data.DataLoader(data, batch_size=micro_batch, sampler=order, generator=workers,
                                             num_workers=num_workers, pin_memory=device.startswith("cuda"))
        for x, y in loader:
            if overfit:
                fixed = fixed if fixed is not None else (x, y)
                x, y = fixed
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if unreadable(data) > seen_unreadable:
            log(f"epoch {epoch}: {unreadable(data) - seen_unreadable} unreadable images skipped "
                "(each replaced by the next readable file)")
            seen_unreadable = unreadable(data)
        epoch, skip = epoch + 1, 0
