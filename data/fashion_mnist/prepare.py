"""
Put the four Fashion-MNIST IDX files into data/fashion_mnist/, checked against their MD5 sums,
from one of three places:

    apt-get install dataset-fashion-mnist     # Debian's package: /usr/share/datasets/fashion-mnist/
    python data/fashion_mnist/prepare.py      # copies from there if it exists, else downloads once
    python data/fashion_mnist/prepare.py --source DIR    # copies from a folder you have
    python data/fashion_mnist/prepare.py --download      # downloads, even with Debian's package
    python train.py --dataset fashion-mnist

The .gz sums are those published with the dataset (https://github.com/zalandoresearch/fashion-mnist,
and torchvision's FashionMNIST). Debian recompresses the files, so its .gz files have other sums;
a file also passes when its (decompressed) content has the MD5 of the IDX data, computed from
Debian's package (dataset-fashion-mnist, files of 2020-06-05).
"""

import argparse
import gzip
import hashlib
import http.client
import os
import shutil
import sys
import urllib.request

URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # the official mirror
DEBIAN = "/usr/share/datasets/fashion-mnist"
HERE = os.path.dirname(os.path.abspath(__file__))
MD5 = {  # name: (MD5 of NAME.gz as published, MD5 of its decompressed IDX content)
    "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
}
BOTH_WAYS = (f"install (or reinstall) Debian's package: apt-get install --reinstall dataset-fashion-mnist; or put "
             f"the four files ({', '.join(n + '.gz' for n in MD5)}) in a folder DIR and pass --source DIR; or pass "
             "--download on a machine with internet access")


def md5(f):
    h = hashlib.md5()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def genuine(path, name):
    """Whether the file at path has a known MD5: that of the official NAME.gz, or (gzipped or not,
    whatever its name) that of the IDX content, as the reader (data/fashion_mnist.py) sees it."""
    with open(path, "rb") as f:
        if md5(f) in MD5[name]:
            return True
        f.seek(0)
        if f.read(2) != b"\x1f\x8b":  # not gzip: the raw bytes were the content
            return False
    try:
        with gzip.open(path, "rb") as f:
            return md5(f) == MD5[name][1]
    except (OSError, EOFError):  # cut short
        return False


def source_file(source, name):
    """SOURCE/NAME.gz or SOURCE/NAME; ValueError if neither is there."""
    for path in (os.path.join(source, name + ".gz"), os.path.join(source, name)):
        if os.path.isfile(path):
            return path
    raise ValueError(f"{source} has no {name}.gz (nor {name}); {BOTH_WAYS}")


def download(name, out):
    """URL/NAME.gz -> OUT/NAME.gz.part; ValueError with what to do instead if the network fails
    (a minute without data counts as failed)."""
    part = os.path.join(out, name + ".gz.part")
    try:
        with urllib.request.urlopen(URL + name + ".gz", timeout=60) as r, open(part, "wb") as f:
            shutil.copyfileobj(r, f)
    except (OSError, http.client.HTTPException) as e:
        if os.path.exists(part):
            os.remove(part)
        raise ValueError(f"cannot download {URL}{name}.gz ({e}); {BOTH_WAYS}") from None
    return part


def prepare(source, out):
    """Every file into OUT (its name kept, .gz or not), checked; source None downloads. A file already
    there and genuine is kept; the other spelling of a name (NAME vs NAME.gz) is removed, as the
    reader takes NAME.gz first."""
    os.makedirs(out, exist_ok=True)
    for name in MD5:
        installed = next((p for p in (os.path.join(out, name + s) for s in (".gz", "")) if os.path.isfile(p)), None)
        if installed and genuine(installed, name):
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
        final = tmp[:-len(".part")]
        os.replace(tmp, final)
        other = final[:-3] if final.endswith(".gz") else final + ".gz"
        if os.path.exists(other):
            os.remove(other)
    print(f"{out}: the four Fashion-MNIST files, checked; now run python train.py --dataset fashion-mnist")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--source", default=DEBIAN if os.path.isdir(DEBIAN) else None,
                       help=f"copy the files from this folder (default: {DEBIAN} if it exists, else download)")
    where.add_argument("--download", action="store_true", help=f"download them from {URL}")
    p.add_argument("--out", default=HERE, help="where train.py --dataset fashion-mnist reads them")
    args = p.parse_args(argv)
    prepare(None if args.download else args.source, args.out)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
