"""
Download CIFAR-10 (the official python version) once, check its MD5, and write it as image folders:

    python data/cifar10/prepare.py          # -> data/cifar10/train/<class>/*.png (50,000)
                                            #    data/cifar10/test/<class>/*.png  (10,000)
    python train.py --dataset cifar10       # then train on it (32 px: the toy preset's size)

--archive PATH uses a copy you already have (it is checked the same way). The batches inside the
archive are pickles; they are read with an unpickler that only builds NumPy arrays, so a
tampered archive cannot run code.
"""

import argparse
import hashlib
import io
import os
import pickle
import shutil
import sys
import tarfile
import urllib.request

import numpy as np
from PIL import Image

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"  # as published with the dataset
HERE = os.path.dirname(os.path.abspath(__file__))
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes and NumPy arrays; refuses every other global. (_codecs.encode is how
    a protocol-2 pickle written by Python 3 spells bytes; it only encodes a string.)"""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a CIFAR-10 batch: not a genuine archive")
        return super().find_class(module, name)


def md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(archive):
    """The archive at `archive`, downloaded first if missing; its MD5 must match."""
    if not os.path.exists(archive):
        print(f"downloading {URL} -> {archive}")
        try:
            urllib.request.urlretrieve(URL, archive + ".part")
        except OSError as e:  # no network, a proxy, a moved file, ...
            raise FileNotFoundError(f"{archive} is missing and its download from {URL} failed ({e}); fetch the file "
                                    "on a machine with access and give it with --archive PATH (or put it at "
                                    f"{archive})") from None
        os.replace(archive + ".part", archive)
    if md5(archive) != MD5:
        raise ValueError(f"{archive} has MD5 {md5(archive)}, expected {MD5}: a partial or altered download; "
                         "delete it and run again")
    return archive


def read_batches(archive):
    """-> class names, {split: (images (N, 32, 32, 3) uint8, labels (N,))}."""
    with tarfile.open(archive, "r:gz") as tar:
        def load(name):
            f = tar.extractfile(f"cifar-10-batches-py/{name}")
            return ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()

        classes = [c.decode() for c in load("batches.meta")[b"label_names"]]
        splits = {}
        for split, names in SPLITS.items():
            batches = [load(n) for n in names]
            data = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            splits[split] = (data, np.concatenate([b[b"labels"] for b in batches]))
    return classes, splits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", default=os.path.join(HERE, "cifar-10-python.tar.gz"),
                   help="where the archive is or will be downloaded to")
    p.add_argument("--out", default=HERE, help="writes OUT/train/<class>/*.png and OUT/test/<class>/*.png")
    args = p.parse_args(argv)
    classes, splits = read_batches(fetch(args.archive))
    for split, (images, labels) in splits.items():
        tmp, final = os.path.join(args.out, f".{split}.tmp"), os.path.join(args.out, split)
        shutil.rmtree(tmp, ignore_errors=True)  # a run killed half-way leaves only this
        for c in classes:
            os.makedirs(os.path.join(tmp, c))
        for i, (img, label) in enumerate(zip(images, labels)):
            Image.fromarray(img).save(os.path.join(tmp, classes[label], f"{i:05d}.png"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        print(f"wrote {len(images)} images to {final}/<class>/")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, pickle.UnpicklingError, tarfile.TarError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
