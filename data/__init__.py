"""
Data for every script: dataset selection (make_dataset), batches for training and evaluation,
each rank's share under torchrun, and the GPT's tokenized dataset. The datasets themselves live in
data/shapes.py (synthetic), data/fashion_mnist.py (IDX files) and data/folders.py (ImageFolder
layout); each data/<name>/ folder holds that dataset's notes and prepare.py.
"""

import json
import os

import numpy as np
import torch
import torch.distributed
from tqdm import tqdm

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


def save_atomically(path, save, *arrays, **named):
    """save(file, *arrays, **named) (np.save, np.savez) into a temporary file, then a rename, so a
    crash never leaves half a file."""
    with open(f"{path}.tmp", "wb") as f:
        save(f, *arrays, **named)
    os.replace(f"{path}.tmp", path)


def rank_block(n, rank, world_size):
    """This rank's contiguous block of n items (blocks in rank order cover 0..n-1 once)."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def rank_share(data, rank, world_size):
    """This rank's block of a held-out split (no padding), so that sums all-reduced over ranks are
    the sums over the whole split."""
    return data if world_size == 1 else torch.utils.data.Subset(data, rank_block(len(data), rank, world_size))


def barrier():
    """Wait for every rank under torchrun; nothing in one process."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


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




def cached_tokens(data, encode, prefix, meta, codebook_size, rank=0, world_size=1, show=True):
    """Every image of data through encode ((b, 3, H, W) -> ids (b, L)) once -> TokenDataset, cached in
    PREFIX_ids.npy, PREFIX_labels.npy and PREFIX_meta.json and reused while meta (what decides the
    ids: the tokenizer, the data; it must hold seq_len, L) is the same. The meta is written last and removed first, so a crash
    mid-write never leaves a meta beside other ids. Under torchrun each rank encodes its block of
    the images into its own file (ranks on other nodes never write into one file); rank 0 joins
    the blocks in rank order."""
    paths = {k: f"{prefix}_{k}" for k in ("ids.npy", "labels.npy", "meta.json")}
    if os.path.exists(paths["meta.json"]) and json.load(open(paths["meta.json"])) == meta:
        return TokenDataset(np.load(paths["ids.npy"], mmap_mode="r"), np.load(paths["labels.npy"]))
    barrier()  # every rank has read the old meta before rank 0 removes it
    if rank == 0:
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        if os.path.exists(paths["meta.json"]):
            os.remove(paths["meta.json"])
    rows = rank_block(len(data), rank, world_size)
    ids = np.empty((len(rows), meta["seq_len"]), np.uint16 if codebook_size <= 2**16 else np.int32)
    labels, start = np.empty(len(rows), np.int64), 0
    for x, y in tqdm(eval_loader(rank_share(data, rank, world_size), 256), desc=f"tokenize {os.path.basename(prefix)}",
                     dynamic_ncols=True, disable=not show):
        ids[start:start + len(x)], labels[start:start + len(x)] = encode(x).numpy(), y.numpy()
        start += len(x)
    for k, array in (("ids.npy", ids), ("labels.npy", labels)):
        save_atomically(f"{paths[k]}.rank{rank}", np.save, array)
    barrier()
    if rank == 0:
        for k in ("ids.npy", "labels.npy"):
            parts = [f"{paths[k]}.rank{r}" for r in range(world_size)]
            save_atomically(paths[k], np.save, np.concatenate([np.load(p) for p in parts]))
            for p in parts:
                os.remove(p)
        save_atomically(paths["meta.json"], lambda f: f.write(json.dumps(meta).encode()))
    barrier()
    return TokenDataset(np.load(paths["ids.npy"], mmap_mode="r"), np.load(paths["labels.npy"]))
