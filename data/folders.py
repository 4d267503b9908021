"""
Image files: the ImageFolder layout (root/<class>/.../<image>: ImageNet, CIFAR-10 after
data/cifar10/prepare.py, your own), and reading one file robustly.
"""

import hashlib
import json
import math
import multiprocessing
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def class_folders(root):
    """The class folders of a split: its visible sub-folders (links followed), sorted."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def training_classes(root):
    """The class list the split at root maps its folders onto: the training split's beside it
    (DATA_PATH/train for DATA_PATH/val), so that a class missing from one split shifts no label;
    root's own class folders when root is the training split or has none beside it."""
    train = os.path.join(os.path.dirname(os.path.abspath(root)), "train")
    return class_folders(train) if os.path.isdir(train) else class_folders(root)


def list_images(root, folder, seen):
    """Image files under root/folder, sorted, as paths relative to root -> (files, {folder read: its
    modification time}). Links to folders are followed, each real folder once (seen: their real
    paths), so a link cycle ends; hidden files and folders (.ipynb_checkpoints, .DS_Store) are
    skipped at every depth."""
    path = os.path.join(root, folder)
    if os.path.realpath(path) in seen:
        return [], {}
    seen.add(os.path.realpath(path))
    mtimes = {folder: os.stat(path).st_mtime_ns}  # before the listing: a file added meanwhile shows next time
    entries = sorted((e for e in os.scandir(path) if not e.name.startswith(".")), key=lambda e: e.name)
    files = [os.path.join(folder, e.name) for e in entries if not e.is_dir() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    for e in entries:
        if e.is_dir():
            more, more_mtimes = list_images(root, os.path.join(folder, e.name), seen)
            files.extend(more)
            mtimes.update(more_mtimes)
    return files, mtimes


def unchanged(root, mtimes):
    """Does every folder a scan read still have the modification time it had? (Adding, removing or
    renaming a file or link changes its folder's time; a folder that is gone counts as changed.)"""
    try:
        return all(os.stat(os.path.join(root, folder)).st_mtime_ns == t for folder, t in mtimes.items())
    except OSError:
        return False


def listing(names, most=8):
    """Names (or numbers) for a one-line message: all of a few, the first of many ('a, b, ... (1000 in all)')."""
    names = [str(n) for n in names]
    return ", ".join(names) if len(names) <= most else f"{', '.join(names[:most])}, ... ({len(names)} in all)"


def scan_folder(root, cache_dir, classes=None):
    """root/<class>/.../<image> -> (classes, [[path relative to root, class index], ...]). classes: the
    list the folders map onto by name (default: training_classes(root)); a folder not in it stops with
    its name. The scan (list_images) of a big tree (ImageNet: 1.28M files) is cached in cache_dir and
    reused while no folder it read has changed."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no folder {root}; see data/imagenet/README.md for the expected layout")
    root_mtime, found = os.stat(root).st_mtime_ns, class_folders(root)
    if not found:
        raise ValueError(f"{root} has no class sub-folders; expected {root}/<class>/<image> "
                         "(see data/imagenet/README.md)")
    classes = list(classes or training_classes(root))
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise ValueError(f"{root} has class folders the training split lacks: {listing(unknown)}; the training "
                         f"split's folders define the classes ({listing(classes)}): add them there or remove them here")
    cache = os.path.join(cache_dir, f"filelist_{hashlib.sha256(root.encode()).hexdigest()[:12]}.json")
    if os.path.exists(cache):
        with open(cache) as f:
            cached = json.load(f)
        if cached.get("root") == root and cached.get("classes") == classes and unchanged(root, cached["mtimes"]):
            return classes, cached["files"]
    files, mtimes, seen = [], {".": root_mtime}, {os.path.realpath(root)}
    for c in found:
        paths, read = list_images(root, c, seen)  # (appended in place: ImageNet has 1,000 folders of 1,300 files)
        files.extend([path, classes.index(c)] for path in paths)
        mtimes.update(read)
    if not files:
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class sub-folders")
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{cache}.{os.getpid()}.tmp"  # one per process: torchrun's ranks may scan at once
    with open(tmp, "w") as f:
        json.dump({"root": root, "classes": classes, "mtimes": mtimes, "files": files}, f)
    os.replace(tmp, cache)
    return classes, files


def read_rgb(path):
    """An image file -> an RGB PIL image: EXIF orientation applied, 16-bit grey scaled (not clipped)
    from the full 16-bit range to 8 bits, transparency composited over white, CMYK / palette / grey
    converted. A zero-byte, truncated, non-image or unreadable file raises: OSError or ValueError
    mostly, but a decoder may raise anything (callers that skip bad files catch Exception)."""
    with Image.open(path) as img:
        img.load()  # decode now, so a truncated file fails here
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # a malformed EXIF block (Pillow has raised ZeroDivisionError, struct.error): as stored
            img = img.copy()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = Image.fromarray((np.asarray(img, dtype=np.float64) * 255 / 65535).round().clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # (P, L and RGB: a transparent key)
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("RGB")


class FolderDataset(torch.utils.data.Dataset):
    """Images in the ImageFolder layout, as (image (3, S, S) in [-1, 1], class). augment: a random
    resized crop keeping >= 80% of the area (the official TokenFlow pipeline) and a horizontal
    flip; otherwise the centre square, resized to S. A file that cannot be read is replaced by the
    next readable one, with a warning line; `unreadable` counts them across worker processes.
    classes: the list its class folders map onto (default: the training split's, training_classes)."""

    def __init__(self, root, image_size, augment, cache_dir, classes=None):
        self.root, self.image_size, self.augment = os.path.abspath(root), image_size, augment
        self.classes, self.files = scan_folder(root, cache_dir, classes)
        self.num_classes = len(self.classes)
        self.unreadable = multiprocessing.Value("q", 0)

    def __len__(self):
        return len(self.files)

    def read(self, i):
        """-> (RGB image, class) of file i, or of the next readable file after it. A bad file is
        counted and reported when its own index is read (once an epoch), not when passed over."""
        tries = min(len(self.files), 100)
        for j in range(tries):
            path, label = self.files[(i + j) % len(self.files)]
            try:
                return read_rgb(os.path.join(self.root, path)), label
            except Exception as e:  # whatever one file makes a decoder raise, it costs that file only
                if j == 0:
                    with self.unreadable.get_lock():
                        self.unreadable.value += 1
                    tqdm.write(f"warning: skipping unreadable image {os.path.join(self.root, path)} "  # not onto a bar
                               f"({type(e).__name__}: {e})", file=sys.stderr)
        raise ValueError(f"{self.root}: {tries} image files in a row, from {self.files[i][0]}, cannot be read; "
                         "check the files and the disk (see the warnings above)")

    def crop_box(self, w, h):
        """(left, top, right, bottom) of the crop: random (area 80-100%, aspect 3/4-4/3) or centre."""
        for _ in range(10 if self.augment else 0):  # as torchvision's RandomResizedCrop
            area = w * h * (0.8 + 0.2 * torch.rand(()).item())
            ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(()).item())
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if cw <= w and ch <= h:
                left, top = torch.randint(0, w - cw + 1, ()).item(), torch.randint(0, h - ch + 1, ()).item()
                return left, top, left + cw, top + ch
        return centre_box(w, h)

    def __getitem__(self, i):
        img, label = self.read(i)
        img = img.resize((self.image_size, self.image_size), Image.BICUBIC, box=self.crop_box(*img.size))
        if self.augment and torch.rand(()) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img), label


def centre_box(w, h):
    """(left, top, right, bottom) of the largest centred square of a w x h image."""
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def to_tensor(img):
    """An RGB PIL image -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def load_images(paths, size):
    """Image files -> (N, 3, size, size) in [-1, 1]: centre square, resized; a bad file raises
    ValueError naming it."""
    out = []
    for path in paths:
        try:
            img = read_rgb(path)
        except Exception as e:  # (a decoder may raise anything; the user needs the file's name)
            raise ValueError(f"cannot read image {path} ({type(e).__name__}: {e}); give an image file") from None
        out.append(to_tensor(img.crop(centre_box(*img.size)).resize((size, size), Image.BICUBIC)))
    return torch.stack(out)
