"""
Put the four Fashion-MNIST IDX files into data/fashion_mnist/, checked against their published
MD5 sums, from one of two places:

    apt-get install dataset-fashion-mnist     # Debian's package: /usr/share/datasets/fashion-mnist/
    python data/fashion_mnist/prepare.py      # copies from there if it exists, else downloads once
    python data/fashion_mnist/prepare.py --source DIR    # or copies from a folder you have
    python train.py --dataset fashion-mnist

The MD5 sums are those published with the dataset (https://github.com/zalandoresearch/fashion-mnist,
and torchvision's FashionMNIST). Debian recompresses the files, so its .gz files have other sums:
a .gz file passes if either the file or its decompressed content matches.
"""

import argparse
import gzip
import hashlib
import os
import shutil
import sys
import urllib.request

URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # the official mirror
DEBIAN = "/usr/share/datasets/fashion-mnist"
HERE = os.path.dirname(os.path.abspath(__file__))
MD5 = {  # name: (MD5 of NAME.gz as distributed, MD5 of the IDX content)
    "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
}
BOTH_WAYS = (f"install Debian's package (apt-get install dataset-fashion-mnist) and run this again, or put the "
             f"four files ({', '.join(n + '.gz' for n in MD5)}) in a folder DIR and pass --source DIR")


def md5(f):
    h = hashlib.md5()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def genuine(path, name):
    """Whether the file at path (NAME.gz or NAME) has a published MD5: of the file, or of its content."""
    with open(path, "rb") as f:
        if md5(f) in MD5[name]:
            return True
    if path.removesuffix(".part").endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                return md5(f) == MD5[name][1]
        except (OSError, EOFError):  # not gzip, or cut short
            return False
    return False


def source_file(source, name):
    """SOURCE/NAME.gz or SOURCE/NAME; ValueError if neither is there."""
    for path in (os.path.join(source, name + ".gz"), os.path.join(source, name)):
        if os.path.isfile(path):
            return path
    raise ValueError(f"{source} has no {name}.gz (nor {name}); {BOTH_WAYS}")


def download(name, out):
    """URL/NAME.gz -> OUT/NAME.gz.part; ValueError with what to do instead if there is no network."""
    try:
        urllib.request.urlretrieve(URL + name + ".gz", os.path.join(out, name + ".gz.part"))
    except OSError as e:
        raise ValueError(f"cannot download {URL}{name}.gz ({e}); {BOTH_WAYS}") from None
    return os.path.join(out, name + ".gz.part")


def prepare(source, out):
    """Every file into OUT (its name kept, .gz or not), checked; a file already there and genuine is kept."""
    os.makedirs(out, exist_ok=True)
    for name in MD5:
        if any(os.path.isfile(p) and genuine(p, name) for p in (os.path.join(out, name + s) for s in (".gz", ""))):
            continue
        if source:
            src = source_file(source, name)
            tmp = os.path.join(out, os.path.basename(src) + ".part")
            shutil.copyfile(src, tmp)
        else:
            print(f"downloading {URL}{name}.gz")
            tmp = download(name, out)
        if not genuine(tmp, name):
            os.remove(tmp)
            raise ValueError(f"{src if source else URL + name + '.gz'} does not match the published MD5 of {name}: "
                             f"a damaged or different file; {BOTH_WAYS}")
        os.replace(tmp, tmp[:-len(".part")])
    print(f"{out}: the four Fashion-MNIST files, checked; now run python train.py --dataset fashion-mnist")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=DEBIAN if os.path.isdir(DEBIAN) else None,
                   help=f"copy the files from this folder (default: {DEBIAN} if it exists, else download)")
    p.add_argument("--out", default=HERE, help="where train.py --dataset fashion-mnist reads them")
    args = p.parse_args(argv)
    prepare(args.source, args.out)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
