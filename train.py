"""
Train TokenFlow, stage by stage: the toy teacher, the tokenizer, then the next-scale GPT.

    python train.py                      # the CPU toy run: shapes -> teacher -> tokenizer -> GPT, into out/
    python train.py --stage gpt          # one stage, reading earlier stages' checkpoints from out/
    python train.py --iters 2            # a smoke run: 2 optimisation steps per stage

Everything a stage needs is saved in its checkpoint (config, weights, optimiser, args), so
sample.py and later stages rebuild models from checkpoints alone.
"""

import argparse
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import tokenflow as tf

# ---------------------------------------------------------------------------------------------
# Per-stage defaults, used where the command line leaves a value unset

DEFAULTS = {  # (preset, stage) -> iterations, global batch size, peak learning rate, EMA decay (0: none)
    ("toy", "teacher"): dict(iters=1000, batch_size=64, lr=1e-3, ema=0),
    ("toy", "tokenizer"): dict(iters=540, batch_size=16, lr=1e-3, ema=0),
    ("toy", "decoder"): dict(iters=300, batch_size=16, lr=1e-3, ema=0),
    # TokenFlow-B: Adam 1e-4 as the paper; its teacher is CLIP ViT-B/16, given with --teacher PATH
    ("tokenflow-b", "tokenizer"): dict(iters=100_000, batch_size=256, lr=1e-4, ema=0.9999),
    # the enhanced-decoder finetune: the paper gives no schedule; half the tokenizer's is our choice
    ("tokenflow-b", "decoder"): dict(iters=50_000, batch_size=256, lr=1e-4, ema=0.9999),
    ("toy", "gpt"): dict(iters=500, batch_size=64, lr=3e-3, ema=0),
    # VAR-d16's recipe: 200 epochs of ImageNet at batch 768, lr 1e-4 * 768 / 256
    ("tokenflow-b", "gpt"): dict(iters=330_000, batch_size=768, lr=3e-4, ema=0.9999),
}
ENHANCED_DECODER = dict(pix_dec_ch=256, pix_dec_res_blocks=4)  # the official enhanced decoder: 237.1M parameters
CODEBOOKS = {"dual": {}, "pixel": dict(sem_dim=0), "semantic": dict(pix_dim=0)}  # --codebook: a half of width 0 is absent
WARMUP = 0.05  # fraction of a stage's steps spent warming up the learning rate
EVAL_IMAGES = 1024  # held-out images per evaluation
DEFAULT_CFG = inspect.signature(tf.GPT.generate).parameters["cfg"].default  # recorded with class_acc


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to train
    p.add_argument("--preset", default="toy", help=f"model sizes, one of {sorted(tf.PRESETS)}")
    p.add_argument("--stage", default="all", choices=["all", "teacher", "tokenizer", "gpt"],
                   help="which stage to run; 'all' runs teacher, tokenizer, then GPT")
    p.add_argument("--teacher", default="toy",
                   help="'toy': the teacher stage trains OUT_DIR/teacher.pt and the tokenizer stage reads it; "
                        "'clip-vit-b16': OpenAI CLIP ViT-B/16, downloaded once into $TOKENFLOW_CACHE "
                        "(~/.cache/tokenflow) and checked; a path: a teacher checkpoint or CLIP weights file")
    # data
    p.add_argument("--dataset", default="shapes", choices=["shapes", "folder", "imagenet", "cifar10"],
                   help="'shapes': synthetic, rendered on the fly; 'folder'/'imagenet': DATA_PATH/train/<class>/"
                        "<image> and DATA_PATH/val/...; 'cifar10': the folders data/cifar10/prepare.py writes")
    p.add_argument("--data-path", default=None, help="root of a folder dataset (cifar10 default: data/cifar10)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--token-images", type=int, default=None,
                   help="images the GPT stage tokenizes (default: 8192 of the endless shapes, all of a folder)")
    # optimisation
    p.add_argument("--iters", type=int, default=None, help="optimisation steps of every stage that runs "
                   "(default: per preset and stage, see DEFAULTS in train.py)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: per preset and stage)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per preset and stage)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per step: each rank runs batch-size / (world size * grad-accum) at a time")
    p.add_argument("--ema", type=float, default=None, help="EMA decay of the weights that evaluation and "
                   "sampling use, 0 for none (default: per preset and stage: 0 toy, 0.9999 tokenflow-b)")
    # tokenizer losses beyond L2 + semantic + VQ (TokenFlow-B: LPIPS 1.0, PatchGAN 0.5 from step 20,000)
    p.add_argument("--lpips-weights", default=None, metavar="DIR",
                   help="LPIPS on: DIR/vgg16-397923af.pth and DIR/vgg.pth, downloaded into DIR once if missing")
    p.add_argument("--disc-start", type=int, default=20_000, help="tokenizer step at which the PatchGAN loss starts")
    p.add_argument("--disc-weight", type=float, default=0.5, help="weight of the generator's hinge loss")
    p.add_argument("--adaptive-disc-weight", action="store_true",
                   help="also scale it by VQGAN's ratio of reconstruction to GAN gradient norms")
    p.add_argument("--codebook", default="dual", choices=list(CODEBOOKS),
                   help="dual: TokenFlow; the paper's baselines under the same budget: pixel: VQGAN-style (pixel "
                        "codes only), semantic: VQKD-style (semantic codes only, trained by the teacher alone; "
                        "the pixel decoder reads them without training them)")
    p.add_argument("--codebook-size", type=int, default=None, help="K, the entries of each table (default: the "
                   "preset's; toy 512, tokenflow-b 32,768)")
    p.add_argument("--enhanced-decoder", action="store_true",
                   help="the official enhanced pixel decoder (channels 256, 4 res blocks per level)")
    p.add_argument("--finetune-decoder", action="store_true",
                   help="with --stage tokenizer: train only the pixel decoder of OUT_DIR/tokenizer.pt (encoders, "
                        "codebooks and semantic decoder frozen) into OUT_DIR/decoder.pt; ids and GPT stay valid")
    p.add_argument("--overfit-batch", action="store_true",
                   help="train on one fixed batch: the loss should go towards zero (a debugging aid)")
    # output and bookkeeping
    p.add_argument("--out-dir", default="out", help="checkpoints, image grids and metrics.jsonl go here")
    p.add_argument("--eval-interval", type=int, default=250, help="held-out evaluation + checkpoint every N steps")
    p.add_argument("--eval-images", type=int, default=EVAL_IMAGES, help="held-out images per evaluation")
    p.add_argument("--resume", action="store_true", help="continue a stage from its checkpoint in OUT_DIR")
    p.add_argument("--seed", type=int, default=0, help="seeds the model init, the data and the held-out split")
    # system
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype of forward passes; weights and optimiser stay fp32; float16 adds a "
                        "gradient scaler (default auto: bfloat16 on a CUDA GPU that has it, else float32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model being trained")
    args = p.parse_args(argv)
    for name in ("iters", "num_workers"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("batch_size", "eval_interval", "eval_images", "lr", "token_images", "grad_accum", "codebook_size"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.preset not in tf.PRESETS:
        p.error(f"unknown preset {args.preset!r}; choose one of {sorted(tf.PRESETS)}")
    if args.teacher == "toy" and (args.preset, "teacher") not in DEFAULTS:
        p.error(f"preset {args.preset!r} has no toy teacher; give --teacher PATH (a teacher checkpoint "
                f"with the preset's ViT sizes)")
    if args.teacher != "toy" and args.stage == "teacher":
        p.error(f"--stage teacher trains the toy teacher; drop --teacher {args.teacher!r} or use --stage tokenizer")
    if args.teacher not in ("toy", "clip-vit-b16") and not os.path.isfile(args.teacher):
        p.error(f"--teacher {args.teacher!r}: no such file; give 'toy', 'clip-vit-b16' or the path of a teacher "
                "checkpoint or CLIP weights")
    if error := resolve_data_path(args):
        p.error(error)
    if args.ema is not None and not 0 <= args.ema < 1:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
    if args.finetune_decoder and args.stage != "tokenizer":
        p.error("--finetune-decoder is a tokenizer-stage run: add --stage tokenizer")
    args.rank, args.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun's
    for stage in stages(args):
        batch, ranks = stage_hparams(args, stage)["batch_size"], args.world_size * args.grad_accum
        if batch % ranks:
            p.error(f"--batch-size {batch} ({stage}) is global and must divide by world size {args.world_size} x "
                    f"--grad-accum {args.grad_accum} = {ranks}; pick a multiple of {ranks}")
    if args.token_images is None and args.dataset == "shapes":
        args.token_images = 8192
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    return args


# ---------------------------------------------------------------------------------------------
# Data: synthetic shapes. Class = geometry only; colour, size, position, rotation and the
# textured background are drawn independently, so semantics and appearance are separable.

SHAPES = ["disk", "ring", "triangle", "square", "plus", "star", "crescent", "bar"]
PALETTE = np.array([  # foreground colours, saturated so they stand out of the grey backgrounds
    [0.90, 0.15, 0.15], [0.15, 0.75, 0.20], [0.20, 0.35, 0.95], [0.95, 0.85, 0.15],
    [0.85, 0.20, 0.85], [0.10, 0.85, 0.90], [0.98, 0.55, 0.10], [0.55, 0.25, 0.85],
], dtype=np.float32)
COLOURS = ["red", "green", "blue", "yellow", "magenta", "cyan", "orange", "purple"]


def shape_sdf(cls, u, v):
    """Approximate signed distance (negative inside, in units of the shape radius) of every shape
    class at local coordinates u, v (B, H, W); -> (B, H, W) for the requested classes cls (B,)."""
    r, theta = torch.sqrt(u * u + v * v), torch.atan2(v, u)

    def ngon(k, radius):  # regular k-gon with the given circumradius
        a = 2 * math.pi / k
        return r * torch.cos(torch.remainder(theta, a) - a / 2) - radius * math.cos(math.pi / k)

    def box(hx, hy):
        qx, qy = u.abs() - hx, v.abs() - hy
        return torch.sqrt(qx.clamp_min(0) ** 2 + qy.clamp_min(0) ** 2) + torch.maximum(qx, qy).clamp_max(0)

    spikes = torch.abs(torch.remainder(theta * 5 / (2 * math.pi), 1.0) * 2 - 1)  # 1 at the 5 tips
    all_sdf = torch.stack([
        r - 1,  # disk
        (r - 0.72).abs() - 0.28,  # ring
        ngon(3, 1.15),  # triangle
        ngon(4, 1.0),  # square
        torch.minimum(box(1.0, 0.32), box(0.32, 1.0)),  # plus
        (r - (0.42 + 0.65 * spikes ** 2)) * 0.6,  # star (scaled: the radial gap overstates distance)
        torch.maximum(r - 1, 0.8 - torch.sqrt((u - 0.5) ** 2 + v * v)),  # crescent
        box(1.05, 0.3),  # bar
    ], dim=1)  # (B, 8, H, W)
    return all_sdf.gather(1, cls.view(-1, 1, 1, 1).expand(-1, 1, *u.shape[1:])).squeeze(1)


class ShapesDataset(torch.utils.data.Dataset):
    """size images, each drawn from its own RNG keyed by (seed, split, index): deterministic, and the
    'val' split never repeats a 'train' image. Items are (image (3, S, S) in [-1, 1], class)."""

    num_classes = len(SHAPES)

    def __init__(self, size, image_size=32, seed=0, split="train"):
        self.size, self.image_size, self.seed, self.split = size, image_size, seed, split

    def __len__(self):
        return self.size

    def params(self, indices):
        """Draw every random choice of the given images -> dict of (B, ...) tensors."""
        rows = []
        for i in indices:
            g = np.random.default_rng([self.seed, {"train": 0, "val": 1}[self.split], int(i)])
            rows.append(dict(
                cls=g.integers(len(SHAPES)), colour=g.integers(len(PALETTE)),
                jitter=g.uniform(-0.06, 0.06, 3), centre=g.uniform(0.35, 0.65, 2), radius=g.uniform(0.26, 0.36),
                angle=g.uniform(0, 2 * math.pi), bg=g.uniform(0.2, 0.55) + g.uniform(-0.05, 0.05, 3),
                stripe=[g.uniform(0, math.pi), g.uniform(3, 8), g.uniform(0, 2 * math.pi), g.uniform(0.03, 0.08)],
                noise=g.normal(0, 0.04, (1, 8, 8)),
            ))
        return {k: torch.tensor(np.stack([r[k] for r in rows]), dtype=torch.float32) for k in rows[0]}

    def render(self, p):
        """params -> images (B, 3, S, S) in [-1, 1]."""
        S, B = self.image_size, p["cls"].shape[0]
        yy, xx = torch.meshgrid(*(2 * [(torch.arange(S) + 0.5) / S]), indexing="ij")  # pixel centres in [0, 1]
        # 1. background: grey-ish base, one sine grating, smooth low-frequency noise
        ang, freq, phase, amp = p["stripe"].unbind(1)
        wave = xx * torch.cos(ang).view(B, 1, 1) + yy * torch.sin(ang).view(B, 1, 1)
        bg = p["bg"].view(B, 3, 1, 1) + (amp.view(B, 1, 1) * torch.sin(2 * math.pi * freq.view(B, 1, 1) * wave
                                                                        + phase.view(B, 1, 1))).unsqueeze(1)
        bg = bg + F.interpolate(p["noise"], size=(S, S), mode="bilinear", align_corners=False)
        # 2. foreground: rotate/scale pixel coordinates into the shape's frame, anti-aliased edge
        dx, dy = xx - p["centre"][:, 0].view(B, 1, 1), yy - p["centre"][:, 1].view(B, 1, 1)
        c, s, rad = torch.cos(p["angle"]).view(B, 1, 1), torch.sin(p["angle"]).view(B, 1, 1), p["radius"].view(B, 1, 1)
        sdf = shape_sdf(p["cls"].long(), (c * dx + s * dy) / rad, (-s * dx + c * dy) / rad)
        alpha = (0.5 - sdf * rad * S).clamp(0, 1).unsqueeze(1)  # distance in pixels -> coverage
        fg = (torch.from_numpy(PALETTE)[p["colour"].long()] + p["jitter"]).view(B, 3, 1, 1)
        return ((alpha * fg + (1 - alpha) * bg).clamp(0, 1) * 2 - 1)

    def __getitems__(self, indices):  # the DataLoader renders a whole batch in one call
        p = self.params(indices)
        return list(zip(self.render(p), p["cls"].long()))

    def __getitem__(self, i):
        return self.__getitems__([i])[0]


# ---------------------------------------------------------------------------------------------
# Data: image folders (ImageNet, CIFAR-10 after data/cifar10/prepare.py, your own)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def scan_folder(root, cache_dir):
    """root/<class>/.../<image> -> (classes, [[path relative to root, class index], ...]), classes =
    sorted sub-folders. The scan of a big tree (ImageNet: 1.28M files) is cached in cache_dir and
    reused while the class folders' modification times are unchanged (adding or removing a file
    changes them)."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no folder {root}; see data/imagenet/README.md for the expected layout")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; expected {root}/<class>/<image> "
                         "(see data/imagenet/README.md)")
    key = {"root": root, "mtimes": [os.stat(os.path.join(root, c)).st_mtime_ns for c in classes]}
    cache = os.path.join(cache_dir, f"filelist_{hashlib.sha256(root.encode()).hexdigest()[:12]}.json")
    if os.path.exists(cache):
        with open(cache) as f:
            cached = json.load(f)
        if cached["key"] == key:
            return classes, cached["files"]
    files = []
    for ci, c in enumerate(classes):
        for folder, _, names in sorted(os.walk(os.path.join(root, c))):
            files += [[os.path.relpath(os.path.join(folder, n), root), ci] for n in sorted(names)
                      if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class sub-folders")
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{cache}.{os.getpid()}.tmp"  # one per process: torchrun's ranks may scan at once
    with open(tmp, "w") as f:
        json.dump({"key": key, "files": files}, f)
    os.replace(tmp, cache)
    return classes, files


BAD_IMAGE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on a bad file


def read_rgb(path):
    """An image file -> an RGB PIL image: EXIF orientation applied, 16-bit grey scaled (not clipped)
    from the full 16-bit range to 8 bits, transparency composited over white, CMYK / palette / grey converted. A zero-byte,
    truncated, non-image or unreadable file raises one of BAD_IMAGE."""
    with Image.open(path) as img:
        img.load()  # decode now, so a truncated file fails here
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = Image.fromarray((np.asarray(img, dtype=np.float64) * 255 / 65535).round().clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # (P, L and RGB: a transparent key)
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("RGB")


class FolderDataset(torch.utils.data.Dataset):
    """Images in the ImageFolder layout, as (image (3, S, S) in [-1, 1], class). augment: a random
    resized crop keeping >= 80% of the area (the official TokenFlow pipeline) and a horizontal
    flip; otherwise the centre square, resized to S. A file that cannot be read is replaced by the
    next readable one, with a warning line; `unreadable` counts them across worker processes."""

    def __init__(self, root, image_size, augment, cache_dir):
        self.root, self.image_size, self.augment = os.path.abspath(root), image_size, augment
        self.classes, self.files = scan_folder(root, cache_dir)
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
            except BAD_IMAGE as e:
                if j == 0:
                    with self.unreadable.get_lock():
                        self.unreadable.value += 1
                    print(f"warning: skipping unreadable image {os.path.join(self.root, path)} "
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
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return left, top, left + side, top + side

    def __getitem__(self, i):
        img, label = self.read(i)
        img = img.resize((self.image_size, self.image_size), Image.BICUBIC, box=self.crop_box(*img.size))
        if self.augment and torch.rand(()) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1), label


def spread(dataset, n):
    """At most n items spread evenly over a dataset (sorted by class, so every class is in)."""
    if n is None or n >= len(dataset):
        return dataset
    subset = torch.utils.data.Subset(dataset, np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist())
    subset.num_classes = dataset.num_classes
    return subset


def make_dataset(args, cfg, split, size=None, augment=None):
    """The train or val split of --dataset; size caps it (shapes: sets it); augment defaults to split == 'train'."""
    if args.dataset == "shapes":
        sizes = {"train": 1_000_000, "val": args.eval_images}  # shapes: effectively endless training data
        return ShapesDataset(size or sizes[split], cfg.image_size, args.seed, split)
    root = os.path.join(args.data_path, split)
    if split == "val" and not os.path.isdir(root):
        root = os.path.join(args.data_path, "test")  # CIFAR-10 calls its held-out split test
    augment = split == "train" if augment is None else augment
    dataset = FolderDataset(root, cfg.image_size, augment, cache_dir=args.out_dir)
    return spread(dataset, size if split == "train" else args.eval_images)


# ---------------------------------------------------------------------------------------------
# Distributed data parallel: torchrun starts one process per device and sets RANK, WORLD_SIZE and
# LOCAL_RANK; without it this is one process of rank 0 in a world of 1 and every helper is a no-op.


def setup_distributed(args):
    """Join torchrun's process group, if there is one (get_args read rank and world size)."""
    if args.world_size > 1:
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per process
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")


def is_main(args):
    """Rank 0 alone logs, writes images and checkpoints."""
    return args.rank == 0


def all_sum(t):
    """A tensor summed over ranks (itself in one process), on the device it came from. NCCL
    reduces CUDA tensors only, so the sum runs on this rank's GPU there."""
    if not dist.is_initialized():
        return t
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    total = t.to(device)
    dist.all_reduce(total)
    return total.to(t.device)


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def main_first(args):
    """Rank 0 runs the block (a download, say) before the other ranks do."""
    if not is_main(args):
        barrier()
    yield
    if is_main(args):
        barrier()


def wrap(args, model):
    """The module step functions call: compiled with --compile, DDP-wrapped under torchrun (DDP
    averages gradients over ranks in backward). The raw module stays the one saved and evaluated."""
    net = torch.compile(model) if args.compile else model
    if args.world_size > 1:
        net = DDP(net, device_ids=[args.device] if args.device.startswith("cuda") else None,
                  gradient_as_bucket_view=True)  # the gradients live in DDP's buckets: no second fp32 copy
    return net


def rank_block(n, args):
    """This rank's contiguous block of n items (blocks in rank order cover 0..n-1 once)."""
    return range(n * args.rank // args.world_size, n * (args.rank + 1) // args.world_size)


def rank_share(dataset, args):
    """This rank's block of a held-out split (no padding), so that sums all-reduced over ranks
    are the sums over the whole split."""
    if args.world_size == 1:
        return dataset
    return torch.utils.data.Subset(dataset, rank_block(len(dataset), args))


def eval_loader(dataset, batch_size):
    """A held-out split in order. Its own generator: evaluating must not draw from the global RNG
    that training uses (scale drop, class drop), or the eval interval would change the training run."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, generator=torch.Generator())


def unreadable(dataset):
    """Files a folder dataset has skipped so far (0 for other datasets)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset.unreadable.value if hasattr(dataset, "unreadable") else 0


def batches(dataset, micro_batch, args, start=0):
    """Endless iterator of this rank's micro-batches (x (b, 3, S, S), y (b,)) on the device, from
    micro-batch `start` on. Epoch e is a permutation seeded by (seed, e), dealt over ranks as
    DistributedSampler does; a resumed run therefore sees the images the uninterrupted run would,
    in the same order. Their augmentation resumes exactly with --num-workers 0 (the main process's
    random state is in the checkpoint); worker processes reseed at each epoch's start."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=args.world_size, rank=args.rank,
                                                  shuffle=True, seed=args.seed, drop_last=True)
    per_epoch = len(sampler) // micro_batch
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} training items are fewer than one batch ({micro_batch} per rank x "
                         f"{args.world_size} ranks); lower --batch-size or add data")
    epoch, skip = divmod(start, per_epoch)
    fixed, seen_unreadable = None, unreadable(dataset)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)[skip * micro_batch: per_epoch * micro_batch]
        workers = torch.Generator().manual_seed(int(np.random.SeedSequence([args.seed, args.rank, epoch])
                                                    .generate_state(1)[0]))  # augmentation seeds of workers
        loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch, sampler=order, generator=workers,
                                             num_workers=args.num_workers, pin_memory=args.device.startswith("cuda"))
        for x, y in loader:
            if args.overfit_batch:
                fixed = fixed if fixed is not None else (x, y)
                x, y = fixed
            yield x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
        if unreadable(dataset) > seen_unreadable:
            log(args, f"epoch {epoch}: {unreadable(dataset) - seen_unreadable} unreadable images skipped "
                      "(each replaced by the next readable file)")
            seen_unreadable = unreadable(dataset)
        epoch, skip = epoch + 1, 0


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


def tokenizer_id(tokenizer):
    """SHA-256 of what decides the ids: both encoders and the codebook (not the decoders, so a
    finetuned decoder keeps its token files and GPT)."""
    h = hashlib.sha256()
    for name, t in sorted(tokenizer.state_dict().items()):
        if name.startswith(("sem_enc", "pix_enc", "codebook")):
            h.update(name.encode())
            h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_atomically(path, save, *arrays, **named):
    """save(file, *arrays, **named) (np.save, np.savez) into a temporary file, then a rename, so a
    crash never leaves half a file."""
    with open(f"{path}.tmp", "wb") as f:
        save(f, *arrays, **named)
    os.replace(f"{path}.tmp", path)


@torch.no_grad()
def token_file(args, tokenizer, split):
    """Tokenize a split once -> TokenDataset; reused while the tokenizer's encoders and codebook and
    the data are the same (out/tokens/<split>_ids.npy, <split>_labels.npy, and <split>_meta.json,
    written last and removed first, so a crash mid-write never leaves a meta beside other ids).
    Under torchrun every rank encodes a block of the images; rank 0 joins the blocks."""
    dataset = make_dataset(args, tokenizer.cfg, split, args.token_images if split == "train" else None, augment=False)
    root = os.path.join(args.out_dir, "tokens")
    paths = {k: os.path.join(root, f"{split}_{k}") for k in ("ids.npy", "labels.npy", "meta.json")}
    meta = {"tokenizer_id": tokenizer_id(tokenizer), "dataset": args.dataset, "data_path": args.data_path,
            "seed": args.seed, "images": len(dataset), "seq_len": tokenizer.cfg.seq_len, "dtype": args.dtype}
    if os.path.exists(paths["meta.json"]) and json.load(open(paths["meta.json"])) == meta:
        return TokenDataset(np.load(paths["ids.npy"], mmap_mode="r"), np.load(paths["labels.npy"]))
    barrier()  # every rank has read the old meta before rank 0 removes it
    if is_main(args):
        os.makedirs(root, exist_ok=True)
        if os.path.exists(paths["meta.json"]):
            os.remove(paths["meta.json"])
    K, rows = tokenizer.cfg.codebook_size, rank_block(len(dataset), args)
    ids = np.empty((len(rows), tokenizer.cfg.seq_len), np.uint16 if K <= 2**16 else np.int32)
    labels, start = np.empty(len(rows), np.int64), 0
    tokenizer.eval()
    for x, y in tqdm(eval_loader(rank_share(dataset, args), 256), desc=f"tokenize {split}", dynamic_ncols=True,
                     disable=not is_main(args)):
        with autocast_ctx(args):
            ids[start:start + len(x)] = tokenizer.encode(x.to(args.device)).cpu().numpy()
        labels[start:start + len(x)] = y.numpy()
        start += len(x)
    for k, array in (("ids.npy", ids), ("labels.npy", labels)):  # one file per rank: ranks on other
        with open(f"{paths[k]}.rank{args.rank}.tmp", "wb") as f:  # nodes never write into one shared file
            np.save(f, array)
    barrier()
    if is_main(args):  # join the blocks in rank order, then the meta, last
        for k in ("ids.npy", "labels.npy"):
            parts = [f"{paths[k]}.rank{r}.tmp" for r in range(args.world_size)]
            save_atomically(paths[k], np.save, np.concatenate([np.load(p) for p in parts]))
            for p in parts:
                os.remove(p)
        with open(paths["meta.json"] + ".tmp", "w") as f:
            json.dump(meta, f)
        os.replace(paths["meta.json"] + ".tmp", paths["meta.json"])
    barrier()
    return TokenDataset(np.load(paths["ids.npy"], mmap_mode="r"), np.load(paths["labels.npy"]))


# ---------------------------------------------------------------------------------------------
# Losses with extra networks: LPIPS (VGG16 + learned heads) and a PatchGAN discriminator

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_SHA256 = "397923af"  # torchvision puts the start of the file's SHA-256 in its name
LPIPS_URL = "https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1"  # LPIPS v0.1 VGG heads (taming's vgg.pth)
LPIPS_MD5 = "d507d7349b931f0638a25a48a722f98a"


def checked_download(url, path, algo, digest):
    """path, downloaded from url if missing; its algo ('sha256', 'md5') hex digest must start with digest."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tqdm.write(f"downloading {url} -> {path}")
        try:
            urllib.request.urlretrieve(url, path + ".part")
        except OSError as e:  # no network, a moved file, ...
            raise FileNotFoundError(f"{path} is missing and its download from {url} failed ({e}); "
                                    "fetch it on a machine with access and put it at that path") from e
        os.replace(path + ".part", path)
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(digest):
        raise ValueError(f"{path} has {algo} {h.hexdigest()}, expected {digest}...: a partial or altered "
                         "download; delete it and run again")
    return path


class LPIPS(nn.Module):
    """Learned perceptual distance, v0.1 (Zhang et al. 2018, https://arxiv.org/abs/1801.03924): VGG16
    features at relu1_2 .. relu5_3, unit-normalised over channels, squared differences weighted per
    channel by 1x1 heads, averaged over space, summed over layers. Images in [-1, 1] -> (B,)."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:
            layers += [nn.MaxPool2d(2)] if v == "M" else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = c if v == "M" else v
        self.features = nn.Sequential(*layers)  # the indices of torchvision's vgg16().features
        self.taps = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        self.lins = nn.ModuleList(nn.Conv2d(ch, 1, 1, bias=False) for ch in (64, 128, 256, 512, 512))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))  # LPIPS's input
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))  # normalisation
        self.requires_grad_(False)

    def forward(self, x, y):
        h, dist, lins = (torch.cat([x, y]) - self.shift) / self.scale, 0, iter(self.lins)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fx, fy = f.chunk(2)
                dist = dist + next(lins)((fx - fy) ** 2).mean((2, 3))
        return dist.flatten()  # (B,)


def load_lpips(weights_dir):
    """LPIPS with weights_dir/vgg16-397923af.pth (torchvision's VGG16) and weights_dir/vgg.pth (the
    LPIPS heads), each downloaded once if missing and checked."""
    vgg = checked_download(VGG16_URL, os.path.join(weights_dir, "vgg16-397923af.pth"), "sha256", VGG16_SHA256)
    heads = checked_download(LPIPS_URL, os.path.join(weights_dir, "vgg.pth"), "md5", LPIPS_MD5)
    lpips, vgg, heads = LPIPS(), tf.read_weights(vgg), tf.read_weights(heads)
    lpips.features.load_state_dict({k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")})
    lpips.lins.load_state_dict({f"{i}.weight": heads[f"lin{i}.model.1.weight"] for i in range(5)})
    return lpips.eval()


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) as VQGAN uses it: 4x4 convs, three stride-2 with BatchNorm and
    LeakyReLU(0.2) -> one real/fake logit per patch (B, 1, h, w)."""

    def __init__(self, ch=64, n_layers=3):
        super().__init__()
        layers, c = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2)], ch
        for i in range(1, n_layers + 1):
            c_out = ch * min(2 ** i, 8)
            layers += [nn.Conv2d(c, c_out, 4, 2 if i < n_layers else 1, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2)]
            c = c_out
        self.net = nn.Sequential(*layers, nn.Conv2d(c, 1, 4, 1, 1))

    def forward(self, x):
        return self.net(x)


def hinge_d_loss(logits_real, logits_fake):
    return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()


def adaptive_weight(rec_loss, g_loss, last_layer):
    """VQGAN's balance (Esser et al. 2021, eq. 7): ||grad rec|| / ||grad g|| at the decoder's last layer."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach()


# ---------------------------------------------------------------------------------------------
# Helpers: learning rate, autocast, logging, image grids


def config_diff(a, b, keys=None):
    """Fields where configs a and b differ -> ["name = a_value vs b_value", ...]."""
    keys = keys or asdict(a).keys()
    return [f"{k} = {getattr(a, k)} vs {getattr(b, k)}" for k in keys if getattr(a, k) != getattr(b, k)]


def resolve_data_path(args):
    """Fill in CIFAR-10's default --data-path; return a one-line complaint if a folder dataset is not there."""
    if args.dataset == "cifar10" and args.data_path is None:
        args.data_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cifar10")
    if args.dataset != "shapes" and not os.path.isdir(os.path.join(args.data_path or "", "train")):
        fix = "run python data/cifar10/prepare.py" if args.dataset == "cifar10" else "see data/imagenet/README.md"
        return (f"--dataset {args.dataset} needs --data-path DIR with DIR/train/<class>/<image>; "
                f"got {args.data_path!r} ({fix})")
    return None


def stages(args):
    """The stages this run trains, in order."""
    if args.finetune_decoder:
        return ["decoder"]
    return [s for s in ("teacher", "tokenizer", "gpt") if args.stage in ("all", s)
            and not (s == "teacher" and args.teacher != "toy")]


def stage_hparams(args, stage):
    """iters, batch_size, lr, ema of a stage: the command line's where given, else DEFAULTS."""
    return {k: v if getattr(args, k) is None else getattr(args, k) for k, v in DEFAULTS[(args.preset, stage)].items()}


def get_lr(step, iters, peak):
    """Linear warmup, then cosine decay to peak / 10."""
    warmup = max(1, int(WARMUP * iters))
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, iters - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def autocast_ctx(args):
    if args.dtype == "float32":
        return nullcontext()
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    return torch.autocast(device_type=args.device.split(":")[0], dtype=dtype)


def log(args, text):
    if is_main(args):
        tqdm.write(text)


def log_metrics(args, row, echo=True):
    """One row of metrics.jsonl and (echo) of the console, from rank 0."""
    if not is_main(args):
        return
    with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    if echo:
        tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


def save_grid(rows, path, zoom=3):
    """rows: list of (B, 3, S, S) tensors in [-1, 1], one grid row each -> PNG, nearest-upscaled."""
    grid = torch.cat([torch.cat(list(r.float().cpu()), dim=2) for r in rows], dim=1)  # (3, rows*S, B*S)
    img = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(img).resize((img.shape[1] * zoom, img.shape[0] * zoom), Image.NEAREST).save(path)


def psnr(x, y):
    """Per-image PSNR in dB of [-1, 1] images, measured on [0, 1] with data range 1 (inf if identical)."""
    mse = ((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse)


def ssim(x, y, window=11, sigma=1.5):
    """Per-image SSIM (Wang et al. 2004) of [-1, 1] images, measured on [0, 1] with data range 1:
    a Gaussian window (11 x 11, sigma 1.5; at most the image side) per channel, no padding,
    C1 = 0.01^2, C2 = 0.03^2. (The official TokenFlow evaluation passes data range 2.0, which
    quadruples C1 and C2 for [0, 1] images and so scores higher than the standard definition.)"""
    if x.device.type == "mps":  # MPS has no float64
        x, y = x.cpu(), y.cpu()
    x, y = (x.double() + 1) / 2, (y.double() + 1) / 2  # float64: E[x^2] - E[x]^2 cancels badly in float32
    window, ch = min(window, x.shape[-1]), x.shape[1]
    g = torch.exp(-((torch.arange(window, device=x.device, dtype=x.dtype) - (window - 1) / 2) / sigma) ** 2 / 2)
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(ch, 1, window, window)

    def blur(t):  # the local weighted mean of each channel
        return F.conv2d(t, kernel, groups=ch)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()


def make_optimizer(params, lr, args, weight_decay):
    # Adam(W) with betas (0.9, 0.95), as TokenFlow
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                             fused=args.device.startswith("cuda"))


class EMA:
    """Exponential moving average of a model's weights (Polyak averaging, as VAR and LlamaGen keep
    one): w_ema <- d w_ema + (1 - d) w after every step, with d warmed up as min(decay, (1+t)/(10+t))
    so the average does not sit at the initialisation in short runs. Evaluation and checkpoints for
    sampling use it; training continues on the raw weights."""

    def __init__(self, model, decay):
        self.decay, self.weights = decay, {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model, step):
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.weights[k].lerp_(v, 1 - d)
            else:
                self.weights[k].copy_(v)  # integer buffers (counters) are copied

    @contextmanager
    def applied(self, model):
        """Within the block the model holds the averaged weights."""
        raw = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.weights)
        try:
            yield
        finally:
            model.load_state_dict(raw)


class NonFiniteLoss(RuntimeError):
    pass


class Interrupt:
    """Within the block, SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop) are remembered rather than
    acted on at once, so the training loop can finish the step, write a checkpoint and exit."""

    def __enter__(self):
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self.previous = {s: signal.signal(s, self.remember) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def remember(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now, the usual way
            self.restore()
            signal.raise_signal(signum)
        self.signal = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def __exit__(self, *exc):
        self.restore()
        if self.signal is not None and exc[0] is None:  # arrived after the last step's check: act on it now
            signal.raise_signal(self.signal)


def resume(args, stage, model, opt, scaler, ema, path):
    """Load a stage's checkpoint into the model and the loop's state -> the step to continue from."""
    ckpt = tf.load_checkpoint(path, "tokenizer" if stage == "decoder" else stage)
    diff = config_diff(tf.config_from_dict(type(model.cfg), ckpt["config"]), model.cfg)
    if diff:
        raise ValueError(f"cannot resume from {path}: checkpoint vs this run differ in "
                         f"{'; '.join(diff)}; use the flags it was trained with or another --out-dir")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):  # empty when the run that saved it had no scaler (fp32, bf16)
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None:
        ema.weights = {k: v.to(args.device) for k, v in ckpt.get("ema", ckpt["model"]).items()}
    if "rng" in ckpt:  # scale drop, class drop and augmentation continue as if never stopped
        torch.set_rng_state(ckpt["rng"])
    if "cuda_rng" in ckpt and args.device.startswith("cuda"):
        torch.cuda.set_rng_state(ckpt["cuda_rng"], args.device)
    log(args, f"{stage}: resumed from {path} at step {ckpt['step']}")
    return ckpt["step"]


def accumulate(args, net, data, step_fn, step, scaler):
    """Forward + backward of --grad-accum micro-batches -> (last loss, its stats, all losses finite?)."""
    finite = True
    for i in range(args.grad_accum):
        x, y = next(data)
        # DDP all-reduces gradients in backward; only the last micro-batch of a step needs to
        sync = net.no_sync() if args.world_size > 1 and i < args.grad_accum - 1 else nullcontext()
        with sync:
            with autocast_ctx(args):
                loss, stats = step_fn(x, y, step)
            finite = finite and bool(torch.isfinite(loss))
            scaler.scale(loss / args.grad_accum).backward()
    return loss, stats, finite


def train_loop(args, stage, model, net, params, dataset, step_fn, eval_fn, save_fn, weight_decay=0.0):
    """The one loop every stage shares: lr -> every N steps eval + checkpoint -> accumulate
    gradients over micro-batches -> clip -> step -> EMA -> log. model is the raw module (saved,
    evaluated), net what step_fn calls (compiled / DDP); step_fn(x, y, step) -> (loss, dict of
    floats); eval_fn() -> dict; save_fn(step, state) saves the model with the loop's state.
    A step whose loss is not finite is skipped (10 in a row stop the run); SIGINT / SIGTERM end
    the current step, write a checkpoint and exit."""
    hp = stage_hparams(args, stage)
    opt = make_optimizer(params, hp["lr"], args, weight_decay)
    scaler = torch.amp.GradScaler(args.device.split(":")[0], enabled=args.dtype == "float16")  # fp16 only
    ema = EMA(model, hp["ema"]) if hp["ema"] > 0 else None
    step, path = 0, os.path.join(args.out_dir, f"{stage}.pt")
    if args.resume and os.path.exists(path):
        step = resume(args, stage, model, opt, scaler, ema, path)
    elif args.resume:
        log(args, f"{stage}: --resume given but there is no {path}; starting from step 0")
    first, saved, skipped, bad_run = step, (step if step else None), 0, 0

    def evaluate():
        with ema.applied(model) if ema else nullcontext():
            return eval_fn()

    def save(step):
        nonlocal saved
        if is_main(args):
            cuda_rng = {"cuda_rng": torch.cuda.get_rng_state(args.device)} if args.device.startswith("cuda") else {}
            save_fn(step, {"optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "rng": torch.get_rng_state(),
                           **cuda_rng, **({"ema": ema.weights} if ema else {})})
        saved = step
        barrier()  # the next stage of every rank reads this file

    accum = args.grad_accum
    data = batches(dataset, hp["batch_size"] // (args.world_size * accum), args, start=step * accum)
    bar = tqdm(range(step, hp["iters"]), desc=stage, dynamic_ncols=True,
               disable=hp["iters"] == step or not is_main(args))
    t0 = time.time()
    with Interrupt() as interrupt:
        for step in bar:
            lr = get_lr(step, hp["iters"], hp["lr"])
            for group in opt.param_groups:
                group["lr"] = lr
            if step > first and step % args.eval_interval == 0:  # (a resumed run has its row and file)
                log_metrics(args, {"stage": stage, "step": step, "split": "val", **evaluate()})
                if bad_run == 0:  # a run of skipped steps keeps the last good checkpoint as it is
                    save(step)
            model.train()
            loss, stats, finite = accumulate(args, net, data, step_fn, step, scaler)
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)  # as TokenFlow: clip at 1.0
            finite = finite and (scaler.is_enabled() or bool(torch.isfinite(grad_norm)))  # fp16: the scaler's job
            # one all-reduce per step: the numbers shown, and whether any rank saw a bad loss or a signal
            flags = all_sum(torch.tensor([loss.item(), *stats.values(), not finite, interrupt.signal is not None],
                                         dtype=torch.float64)).tolist()
            bad, stop = flags[-2] > 0, flags[-1] > 0
            if bad:  # skip the update: every rank agrees, so the weights stay the same everywhere
                skipped, bad_run = skipped + 1, bad_run + 1
                log(args, f"{stage}: step {step}: non-finite loss or gradient, step skipped ({skipped} so far)")
                if bad_run == 10:
                    last = f"{path} holds step {saved}" if saved is not None else "no checkpoint was written yet"
                    raise NonFiniteLoss(f"{stage}: 10 non-finite losses in a row (steps {step - 9}-{step}); stopped "
                                        f"without saving; {last}. Lower --lr or check the data, then --resume")
            else:
                scaler.step(opt)
                bad_run = 0
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if ema and not bad:
                ema.update(model, step)
            bar.set_postfix(loss=f"{flags[0] / args.world_size:.4f}", gnorm=f"{grad_norm.item():.2f}", lr=f"{lr:.2e}",
                            **{k: f"{v / args.world_size:.3g}" for k, v in zip(stats, flags[1:-2])})
            if stop:
                signum, interrupt.signal = interrupt.signal or signal.SIGTERM, None  # (another rank's)
                if (step + 1) % args.eval_interval == 0 and step + 1 < hp["iters"]:  # the row a resume skips
                    log_metrics(args, {"stage": stage, "step": step + 1, "split": "val", **evaluate()})
                if bad_run == 0:
                    save(step + 1)
                written = f"checkpoint written to {path}" if bad_run == 0 else f"{path} holds step {saved}"
                log(args, f"{stage}: {signal.Signals(signum).name} at step {step + 1}: {written}; "
                          "run the same command with --resume to continue")
                raise SystemExit(128 + signum)
    step = hp["iters"]
    row = {"stage": stage, "step": step, "split": "val", **evaluate(), "train_s": round(time.time() - t0, 1),
           **({"skipped_steps": skipped} if skipped else {})}
    log_metrics(args, row)
    save(step)
    if ema:
        model.load_state_dict(ema.weights)  # what later stages and sampling use, as load_model does
    return row


# ---------------------------------------------------------------------------------------------
# Stage 1: the toy teacher, a small ViT classifier standing in for CLIP


@torch.no_grad()
def evaluate_teacher(args, teacher):
    teacher.eval()
    correct = seen = 0
    for x, y in eval_loader(rank_share(make_dataset(args, teacher.cfg, "val"), args), 256):
        with autocast_ctx(args):
            correct += (teacher(x.to(args.device)).argmax(1).cpu() == y).sum().item()
        seen += len(y)
    correct, seen = all_sum(torch.tensor([correct, seen], dtype=torch.float64)).tolist()
    return {"acc": correct / seen}


def train_teacher(args, cfg):
    torch.manual_seed(args.seed)
    data = make_dataset(args, cfg, "train")
    teacher = tf.Teacher(cfg, data.num_classes).to(args.device)
    net = wrap(args, teacher)

    def step_fn(x, y, _):
        loss = F.cross_entropy(net(x), y)
        return loss, {}

    def save_fn(step, state):
        tf.save_checkpoint(os.path.join(args.out_dir, "teacher.pt"), "teacher", cfg, teacher, step,
                           num_classes=teacher.num_classes, args=vars(args), **state)

    return train_loop(args, "teacher", teacher, net, list(teacher.parameters()), data, step_fn,
                      lambda: evaluate_teacher(args, teacher), save_fn, weight_decay=0.05)


# ---------------------------------------------------------------------------------------------
# Stage 2: the tokenizer


CLIP_URL = ("https://openaipublic.azureedge.net/clip/models/"
            "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt")  # SHA-256 in the path


def fetch_clip():
    """OpenAI's ViT-B/16 file, downloaded once into the cache; its SHA-256 must be the one in the URL."""
    cache = os.environ.get("TOKENFLOW_CACHE", os.path.expanduser("~/.cache/tokenflow"))
    path = os.path.join(cache, os.path.basename(CLIP_URL))
    return checked_download(CLIP_URL, path, "sha256", CLIP_URL.split("/")[-2])


def clip_teacher(path, cfg):
    """CLIP weights as a Teacher for cfg (position embeddings resized to cfg.grid); the ViT sizes
    come from the weights and must be the preset's."""
    vit = tf.load_clip(path, grid=cfg.grid)
    found = {"patch_size": vit.conv1.kernel_size[0], "vit_width": len(vit.class_embedding),
             "vit_depth": len(vit.blocks), "vit_heads": vit.blocks[0].attn.heads,
             "teacher_dim": vit.proj.out_features, "vit_stem_ch": 0, "vit_quick_gelu": True}
    diff = [f"{k} = {v} vs {getattr(cfg, k)}" for k, v in found.items() if v != getattr(cfg, k)]
    if diff:
        raise ValueError(f"CLIP weights {path} vs the preset differ in {'; '.join(diff)} (CLIP vs preset)")
    teacher = tf.Teacher(cfg)
    teacher.proj.load_state_dict(vit.proj.state_dict())
    del vit.proj
    teacher.vit.load_state_dict(vit.state_dict())
    return teacher


def load_teacher(args, cfg):
    """The frozen teacher (the toy one, our own checkpoint, or CLIP), checked against the preset."""
    path = {"toy": os.path.join(args.out_dir, "teacher.pt"), "clip-vit-b16": None}.get(args.teacher, args.teacher)
    if path is None:
        with main_first(args):  # one download, not one per rank
            path = fetch_clip()
    if args.teacher != "toy" and "visual.conv1.weight" in tf.read_weights(path):
        return clip_teacher(path, cfg).to(args.device).eval().requires_grad_(False)
    teacher, _ = tf.load_model(path, "teacher")
    diff = config_diff(teacher.cfg, cfg, ("image_size", "patch_size", "vit_width", "vit_depth", "vit_heads",
                                          "vit_quick_gelu", "vit_stem_ch", "teacher_dim", "sem_mean", "sem_std"))
    if diff:
        raise ValueError(f"teacher {path} vs the tokenizer's config differ in {'; '.join(diff)}; "
                         "use the teacher of this preset")
    return teacher.to(args.device).eval().requires_grad_(False)


@torch.no_grad()
def evaluate_tokenizer(args, tokenizer, teacher, grid_png="reconstructions.png"):
    """Held-out PSNR and SSIM, codebook usage and perplexity (over all tokens, and per scale: a
    scale of side s can hit at most images * s^2 codes), semantic cosine to the teacher and, with a
    toy teacher, how often it classifies the reconstructions right (recon_acc: the most that
    generated images can score). The tokens go through the real path (encode -> ids -> decode).
    Under torchrun each rank takes a share of the images and the sums are all-reduced. The first
    16 reconstructions go to OUT_DIR/grid_png (None: no image)."""
    tokenizer.eval()
    cfg, has_sem, has_head = tokenizer.cfg, tokenizer.sem_dec is not None, teacher.head is not None
    sums = dict.fromkeys(["images", "psnr", "ssim", "sem_cos", "recon_acc"], 0.0)
    counts = torch.zeros(len(cfg.scales), cfg.codebook_size, device=args.device)  # code histogram per scale
    for i, (x, y) in enumerate(eval_loader(rank_share(make_dataset(args, cfg, "val"), args), 128)):
        x, y = x.to(args.device), y.to(args.device)
        with autocast_ctx(args):
            idx = tokenizer.encode(x)
            f_hat = tokenizer.indices_to_features(idx)
            x_rec = tokenizer.pixel_decode(f_hat).clamp(-1, 1)
            if has_sem:
                sem = tokenizer.semantic_decode(f_hat).float()
                sums["sem_cos"] += F.cosine_similarity(sem, teacher.features(x).float(), dim=-1).mean(1).sum().item()
            if has_head:
                sums["recon_acc"] += (teacher(x_rec).argmax(1) == y).sum().item()
        if i == 0 and is_main(args) and grid_png:
            save_grid([x[:16], x_rec[:16]], os.path.join(args.out_dir, grid_png))
        sums["images"] += len(x)
        sums["psnr"] += psnr(x_rec, x).clamp_max(100).sum().item()  # an exact copy is inf dB: keep the mean finite
        sums["ssim"] += ssim(x_rec, x).sum().item()
        for k, ids in enumerate(idx.split([s * s for s in cfg.scales], dim=1)):
            counts[k] += torch.bincount(ids.flatten(), minlength=cfg.codebook_size)
    totals = dict(zip(sums, all_sum(torch.tensor(list(sums.values()), dtype=torch.float64)).tolist()))
    counts = all_sum(counts)
    usage, perplexity = tf.codebook_usage(counts.sum(0))
    per_scale = [tf.codebook_usage(c) for c in counts]
    kept = ["psnr", "ssim"] + ["sem_cos"] * has_sem + ["recon_acc"] * has_head
    return {**{k: totals[k] / totals["images"] for k in kept}, "usage": usage.item(), "perplexity": perplexity.item(),
            "usage_per_scale": [round(u.item(), 4) for u, _ in per_scale],
            "perplexity_per_scale": [round(p.item(), 2) for _, p in per_scale]}


class DiscriminatorLoss(nn.Module):
    """The discriminator's hinge loss on a real and a fake batch as one forward, so that DDP sees
    one forward per backward."""

    def __init__(self, disc):
        super().__init__()
        self.disc = disc

    def forward(self, real, fake):
        return hinge_d_loss(self.disc(real), self.disc(fake))


def pixel_losses(args, hp, path):
    """The image losses beyond L2: LPIPS (with --lpips-weights) and, for a run that reaches
    --disc-start, the PatchGAN -> (lpips or None, gan or None); gan holds the discriminator, its
    DDP-wrapped loss and its optimiser, resumed from path with the stage."""
    with main_first(args):  # one download, not one per rank
        lpips = load_lpips(args.lpips_weights).to(args.device) if args.lpips_weights else None
    log(args, f"{os.path.basename(path)[:-3]}: LPIPS {'on' if lpips else 'off (no --lpips-weights)'}, "
              f"PatchGAN from step {args.disc_start}")
    if args.disc_start >= hp["iters"]:  # only a run that reaches the GAN builds (and saves) the discriminator
        return lpips, None
    with torch.random.fork_rng(devices=[]):  # its init leaves the training RNG (scale drop) as it was
        disc = PatchDiscriminator().to(args.device)
    gan = {"disc": disc, "net": wrap(args, DiscriminatorLoss(disc)),
           "opt": torch.optim.AdamW(disc.parameters(), lr=hp["lr"], betas=(0.5, 0.9))}  # VQGAN's D betas
    if args.resume and os.path.exists(path) and "disc" in (ckpt := tf.load_checkpoint(path, "tokenizer")):
        disc.load_state_dict(ckpt["disc"])
        gan["opt"].load_state_dict(ckpt["disc_optimizer"])
    return lpips, gan


def reconstruction_loss(args, x_rec, x, step, lpips, gan, last_layer):
    """L2 + LPIPS (weight 1) and, from --disc-start on, one discriminator step and the generator's
    hinge term (weight --disc-weight) -> (loss, dict of floats). With --grad-accum the
    discriminator steps on every micro-batch."""
    rec = F.mse_loss(x_rec, x) + (lpips(x_rec, x).mean() if lpips else 0)
    log = {"rec": rec.item()}
    if step < args.disc_start:
        return rec, log
    gan["opt"].zero_grad(set_to_none=True)
    d_loss = gan["net"](x, x_rec.detach())
    d_loss.backward()
    if all(p.grad.isfinite().all() for p in gan["disc"].parameters()):  # (all-reduced: the same on every rank)
        gan["opt"].step()  # a bad batch must not reach the discriminator's weights
    gan["disc"].requires_grad_(False)  # the generator's term trains the decoder, not the discriminator
    g_loss = -gan["disc"](x_rec).mean()
    gan["disc"].requires_grad_(True)
    w = adaptive_weight(rec, g_loss, last_layer) if args.adaptive_disc_weight else 1
    if args.adaptive_disc_weight and args.world_size > 1:  # each rank's is from its own batch: use their mean
        w = all_sum(w.clone()) / args.world_size
    return rec + args.disc_weight * w * g_loss, {**log, "d": d_loss.item(), "g": g_loss.item()}


def gan_state(gan):
    return {"disc": gan["disc"].state_dict(), "disc_optimizer": gan["opt"].state_dict()} if gan else {}


def train_tokenizer(args, cfg):
    teacher = load_teacher(args, cfg)
    torch.manual_seed(args.seed)
    tokenizer = tf.TokenFlow(cfg).to(args.device)
    if tokenizer.sem_enc is not None:
        tokenizer.sem_enc.load_state_dict(teacher.vit.state_dict())  # the semantic encoder starts as the teacher
    net, path = wrap(args, tokenizer), os.path.join(args.out_dir, "tokenizer.pt")
    lpips, gan = pixel_losses(args, stage_hparams(args, "tokenizer"), path)

    def step_fn(x, y, step):
        x_rec, sem, stats = net(x)
        rec, log = reconstruction_loss(args, x_rec, x, step, lpips, gan, tokenizer.pix_dec.conv_out.weight)
        if sem is None:  # --codebook pixel: no semantic half, no semantic loss
            return rec + stats["vq"], {**log, "usage": stats["usage"].item()}
        with torch.no_grad():
            target = teacher.features(x)  # (B, n*n, T)
        sem_loss = (1 - F.cosine_similarity(sem, target, dim=-1)).mean()  # TokenFlow's semantic loss
        return rec + sem_loss + stats["vq"], {**log, "sem": sem_loss.item(), "usage": stats["usage"].item()}

    def save_fn(step, state):
        tf.save_checkpoint(path, "tokenizer", cfg, tokenizer, step, args=vars(args), **state, **gan_state(gan))

    return train_loop(args, "tokenizer", tokenizer, net, list(tokenizer.parameters()), make_dataset(args, cfg, "train"),
                      step_fn, lambda: evaluate_tokenizer(args, tokenizer, teacher), save_fn)


def finetune_decoder(args, cfg):
    """The enhanced-decoder stage: the encoders, codebooks and semantic decoder of OUT_DIR/tokenizer.pt
    frozen, a pixel decoder of cfg's size (the trained one when the sizes agree, else a new one)
    trained on the reconstruction losses of the inference-time features (all scales) -> OUT_DIR/decoder.pt,
    a whole tokenizer with the same ids, so token files and GPT stay valid."""
    trained, _ = tf.load_model(os.path.join(args.out_dir, "tokenizer.pt"), "tokenizer")
    diff = config_diff(trained.cfg, cfg, [k for k in asdict(cfg) if not k.startswith("pix_dec")])
    if diff:
        raise ValueError(f"{args.out_dir}/tokenizer.pt vs preset {args.preset!r} differ in {'; '.join(diff)}; "
                         "pass the --codebook it was trained with, or finetune a tokenizer of this preset")
    teacher = load_teacher(args, cfg)
    torch.manual_seed(args.seed)
    tokenizer = tf.TokenFlow(cfg)
    same = trained.cfg == cfg
    missing, _ = tokenizer.load_state_dict({k: v for k, v in trained.state_dict().items()
                                            if same or not k.startswith("pix_dec.")}, strict=same)
    assert all(k.startswith("pix_dec.") for k in missing), missing  # only the new decoder starts fresh
    tokenizer = tokenizer.to(args.device).requires_grad_(False)
    tokenizer.pix_dec.requires_grad_(True)
    net, path = wrap(args, tokenizer.pix_dec), os.path.join(args.out_dir, "decoder.pt")
    if args.resume and os.path.exists(path) and tokenizer_id(tf.load_model(path, "tokenizer")[0]) != tokenizer_id(trained):
        raise ValueError(f"cannot resume {path}: its encoders and codebook are not those of {args.out_dir}/tokenizer.pt "
                         "(retrained since?); drop --resume to finetune the decoder of the current tokenizer")
    lpips, gan = pixel_losses(args, stage_hparams(args, "decoder"), path)
    log(args, f"decoder: {'finetuning the trained' if same else 'training a new'} pixel decoder "
              f"({sum(p.numel() for p in tokenizer.pix_dec.parameters()):,} parameters), the rest frozen")

    def step_fn(x, y, step):
        with torch.no_grad():
            f_hat, _, _ = tokenizer.quantize(tokenizer.features(x), cfg.scales)
        return reconstruction_loss(args, net(tokenizer.pixel_half(f_hat)), x, step, lpips, gan,
                                   tokenizer.pix_dec.conv_out.weight)

    def save_fn(step, state):
        tf.save_checkpoint(path, "tokenizer", cfg, tokenizer, step, args=vars(args), **state, **gan_state(gan))

    return train_loop(args, "decoder", tokenizer, net, list(tokenizer.pix_dec.parameters()),
                      make_dataset(args, cfg, "train"), step_fn, lambda: evaluate_tokenizer(args, tokenizer, teacher),
                      save_fn)


# ---------------------------------------------------------------------------------------------
# Stage 3: the next-scale GPT, on the tokenizer's ids


@torch.no_grad()
def sample_grid(args, gpt, tokenizer, per_class=8, **kw):
    """per_class generated images of every class (at most 16 classes) -> (rows of images, labels)."""
    labels = torch.arange(min(gpt.cfg.num_classes, 16), device=args.device).repeat_interleave(per_class)
    g = torch.Generator(args.device).manual_seed(args.seed)  # the same samples at every evaluation
    with autocast_ctx(args):
        x = tokenizer.decode(gpt.generate(labels, generator=g, **kw))
    return list(x.split(per_class)), labels


@torch.no_grad()
def evaluate_gpt(args, gpt, tokenizer, val):
    """Held-out next-token loss and token accuracy (overall and per scale); writes gpt_samples.png."""
    gpt.eval()
    S = len(gpt.scales)
    loss, hits, counts = torch.zeros(1, dtype=torch.float64), torch.zeros(S, dtype=torch.float64), torch.zeros(S, dtype=torch.float64)  # sums
    for idx, y in eval_loader(rank_share(val, args), 256):
        idx, y = idx.to(args.device), y.to(args.device)
        with autocast_ctx(args):
            logits = gpt(idx, y)
        loss += F.cross_entropy(logits.flatten(0, 1).float(), idx.flatten(), reduction="sum").item()
        correct = (logits.argmax(-1) == idx).double().sum(0).cpu()  # (L,)
        hits.index_add_(0, gpt.level.cpu(), correct)
        counts.index_add_(0, gpt.level.cpu(), torch.full_like(correct, len(idx)))
    loss, hits, counts = all_sum(torch.cat([loss, hits, counts])).split([1, S, S])
    if is_main(args):
        rows, _ = sample_grid(args, gpt, tokenizer)
        save_grid(rows, os.path.join(args.out_dir, "gpt_samples.png"))
    return {"loss": (loss / counts.sum()).item(), "acc": (hits.sum() / counts.sum()).item(),
            "acc_per_scale": [round(a, 4) for a in (hits / counts).tolist()]}


@torch.no_grad()
def class_accuracy(args, gpt, tokenizer, teacher, cfg, per_class=10):
    """per_class samples of every class -> how often the teacher's class head picks the requested class
    (1) on the decoded images and (2) on the semantic features decoded from the same ids (the
    understanding path: do the generated ids carry the class?)."""
    gpt.eval()
    labels = torch.arange(gpt.cfg.num_classes, device=args.device).repeat_interleave(per_class)
    g = torch.Generator(args.device).manual_seed(args.seed)
    with autocast_ctx(args):
        idx = gpt.generate(labels, cfg=cfg, generator=g)
        image = teacher(tokenizer.decode(idx)).argmax(1)
        if tokenizer.sem_dec is None:  # --codebook pixel: no semantic features to read
            return (image == labels).float().mean().item(), None
        sem = teacher.head(tokenizer.semantic_features(idx).mean(1)).argmax(1)
    return (image == labels).float().mean().item(), (sem == labels).float().mean().item()


def train_gpt(args, tok_cfg, gpt_cfg):
    tokenizer_path = os.path.join(args.out_dir, "tokenizer.pt")
    tokenizer, _ = tf.load_model(tokenizer_path, "tokenizer")
    diff = config_diff(tokenizer.cfg, tok_cfg)
    if diff:
        raise ValueError(f"tokenizer {tokenizer_path} vs preset {args.preset!r} differ in {'; '.join(diff)}; "
                         "pass the --codebook and --enhanced-decoder it was trained with, or train a tokenizer "
                         "for this preset first")
    tokenizer = tokenizer.to(args.device).eval().requires_grad_(False)
    train_set, val_set = (token_file(args, tokenizer, split) for split in ("train", "val"))
    gpt_path, tid = os.path.join(args.out_dir, "gpt.pt"), tokenizer_id(tokenizer)
    if args.resume and os.path.exists(gpt_path):
        trained_on = tf.load_checkpoint(gpt_path, "gpt")["tokenizer_id"]
        if trained_on != tid:
            raise ValueError(f"cannot resume {gpt_path}: it was trained on the ids of another tokenizer "
                             f"({trained_on[:12]} vs {tid[:12]} for {tokenizer_path}); "
                             "train the GPT from scratch (drop --resume) or use another --out-dir")
    gpt_cfg = replace(gpt_cfg, num_classes=make_dataset(args, tok_cfg, "val").num_classes)
    torch.manual_seed(args.seed)
    gpt = tf.GPT(gpt_cfg, tokenizer).to(args.device)
    net = wrap(args, gpt)

    def step_fn(idx, y, _):
        logits = net(idx, y)  # (B, L, K)
        return F.cross_entropy(logits.flatten(0, 1).float(), idx.flatten()), {}

    def save_fn(step, state):
        tf.save_checkpoint(gpt_path, "gpt", gpt_cfg, gpt, step, tokenizer_config=asdict(tokenizer.cfg),
                           tokenizer_id=tid, args=vars(args), **state)

    row = train_loop(args, "gpt", gpt, net, list(gpt.parameters()), train_set, step_fn,
                     lambda: evaluate_gpt(args, gpt, tokenizer, val_set), save_fn, weight_decay=0.05)
    teacher = load_teacher(args, tok_cfg)
    if teacher.head is not None and is_main(args):  # the toy teacher can classify what the GPT generates
        (acc, sem_acc), (acc0, sem_acc0) = (class_accuracy(args, gpt, tokenizer, teacher, c) for c in (DEFAULT_CFG, 0))
        row = {"stage": "gpt", "step": row["step"], "split": "generated", "cfg": DEFAULT_CFG, "class_acc": acc,
               "class_acc_cfg0": acc0, "sem_class_acc": sem_acc, "sem_class_acc_cfg0": sem_acc0}
        log_metrics(args, row)
    return row


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    setup_distributed(args)
    os.makedirs(args.out_dir, exist_ok=True)
    cfg = tf.PRESETS[args.preset]["tokenizer"]
    cfg = replace(cfg, **CODEBOOKS[args.codebook], **(ENHANCED_DECODER if args.enhanced_decoder else {}),
                  codebook_size=args.codebook_size or cfg.codebook_size)
    run = {"teacher": lambda: train_teacher(args, cfg), "tokenizer": lambda: train_tokenizer(args, cfg),
           "decoder": lambda: finetune_decoder(args, cfg),
           "gpt": lambda: train_gpt(args, cfg, tf.PRESETS[args.preset]["gpt"])}
    try:
        return {stage: run[stage]() for stage in stages(args)}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_script(main):
    """A script's main() with its failures as one line on stderr: bad input exits 2, a training
    run stopped by non-finite losses exits 1."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_script(main)
