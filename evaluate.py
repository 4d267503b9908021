"""
Measure a trained tokenizer and GPT: the metric functions (train.py imports them for its held-out
evaluations; this file imports no script), and three commands.

    python evaluate.py                                    # held-out PSNR, SSIM, usage, ...; class_acc, FD
    python evaluate.py probe [--pool grid]                # linear probes on each half of the codes
    python evaluate.py neighbours [--k 5]                 # nearest held-out images by each half: precision@k, a picture
    python evaluate.py export --num-images 50000          # out/samples.npz for the ADM suite (gFID, IS)
    python evaluate.py export --ref --num-images 50000    # out/reference.npz: real held-out images
    python evaluate.py export --recon --num-images 50000  # out/reconstructions.npz: the same, reconstructed (rFID)

All modes read the tokenizer in --out-dir (or --tokenizer) and take the teacher, the dataset and
the seed it was trained with from its checkpoint (--teacher, --dataset and --data-path override
them).

eval prints a table and appends one JSON line per metric set to OUT_DIR/metrics.jsonl.
Held-out tokenizer metrics, through encode -> ids -> decode: PSNR and SSIM on [0, 1] images with
data range 1; codebook usage (the fraction of the K codes the held-out tokens hit) and
perplexity (the exponential of the entropy of that histogram), overall and per scale; the
semantic cosine to the teacher; with the toy teacher, recon_acc (its class accuracy on the
reconstructions) beside teacher_acc (on the images themselves); with OUT_DIR/judge.pt (train.py
--stage judge), recon_class_acc (the judge on the reconstructions: the most a generator can score
through this decoder) beside judge_acc. With gpt.pt it also generates --num-images
class-balanced samples (default: as many as the held-out images) at cfg 0 and at the default
guidance (or --cfg-scale), scored by score_generated: class_acc (the judge's class of each image, and
per class), teacher_class_acc, sem_class_acc (the teacher's head on the semantic features decoded
from the same ids) and, on shapes, colours (distinct foreground colours per class, of 8: the
diversity guard). FD-teacher and FD-judge are Frechet distances between mean-pooled teacher
features (pooled judge features) of the samples and of the held-out images; the matrix square
root is an eigen-decomposition (no scipy). fd_*_real is the same distance for as many real
training images, the floor at that sample size. They are toy-scale checks, not FID.

probe fits multinomial logistic regression: one L-BFGS run of at most 100 iterations from zero
weights, weight decay 1e-4, on standardised features of --probe-images training images (4,096),
scored on the held-out split. It prints a table and appends one line per feature kind to
metrics.jsonl. Four kinds of features: the semantic half of the quantized codes, the pixel half,
both, and the continuous teacher features. Targets: the class and, on shapes, the foreground
colour. The probes read the final sum of all scales' codes. --pool mean averages the features
over the token grid; --pool grid flattens the grid, n^2 times wider: fine for the toy, too big
for ImageNet on CPU.

export writes uint8 (N, H, W, 3) images under arr_0 (labels under arr_1), the .npz layout of the
ADM evaluation suite (https://github.com/openai/guided-diffusion/tree/main/evaluations), which
VAR and LlamaGen report FID and IS with. gFID: ADM's evaluator.py on the ImageNet reference batch
and samples.npz. rFID: the same script on reference.npz and reconstructions.npz. That suite needs
TensorFlow, so it runs outside this repo. TokenFlow-B's images are 224 px, and ADM's ImageNet
reference batches are 256 px.
"""

import argparse
import inspect
import json
import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import tokenflow as tf
from data import DATASETS, EVAL_IMAGES, eval_loader, make_dataset, resolve_data_path
from data.shapes import PALETTE, ShapesDataset, colour_coverage, foreground_colours
from utils.checkpoints import load_model, save_atomically
from utils.cli import (IMAGE_OUTPUTS, SAMPLING_NUMBERS, check_classes, check_device, check_folder, check_input_file,
                       check_numbers, check_output_file, parse_refine, run_script)
from utils.grids import class_rows, keep_class_examples, save_grid, to_uint8
from utils.weights import load_teacher, teacher_path

SAMPLING = {k: v.default for k, v in inspect.signature(tf.GPT.generate).parameters.items()
            if k not in ("self", "labels", "generator")}  # GPT.generate's defaults, as sample.py uses them
DEFAULT_CFG_SCALE = SAMPLING["cfg_scale"]  # GPT.generate's guidance weight, recorded with class_acc

# ---------------------------------------------------------------------------------------------
# Metrics


def autocast_ctx(device, dtype):
    """Autocast for 'bfloat16' / 'float16' forwards on device; nothing for 'float32'."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def ssim(x, y, window=11, sigma=1.5):
    """Per-image SSIM (Wang et al. 2004) of [-1, 1] images (B, C, H, W) -> (B,), measured on [0, 1]
    with data range 1: a Gaussian window (11 x 11, sigma 1.5; at most the image side) per channel, no
    padding, C1 = 0.01^2, C2 = 0.03^2. (The official TokenFlow evaluation passes data range 2.0,
    which quadruples C1 and C2 for [0, 1] images and so scores higher than the standard definition.)"""
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


def frechet_distance(a_ND, b_MD):
    """Frechet distance between Gaussians fitted to two feature sets (N, D) and (M, D), FID's formula
    (Heusel et al. 2017): |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2). tr (S_a S_b)^1/2 is the
    sum of the square roots of the eigenvalues of S_a^1/2 S_b S_a^1/2, which is symmetric PSD: two
    eigh calls in float64 instead of scipy's sqrtm."""
    a, b = a_ND.double(), b_MD.double()
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T  # S_a^1/2
    m = root_a @ s_b @ root_a
    cross = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()  # symmetric up to rounding
    return ((a.mean(0) - b.mean(0)).square().sum() + s_a.trace() + s_b.trace() - 2 * cross).item()


def linear_probe(x_train, y_train, x_val, y_val, num_classes, steps=100, weight_decay=1e-4):
    """Multinomial logistic regression on standardised features, trained with full-batch L-BFGS for a
    fixed budget of steps from zero weights (so it is deterministic) -> held-out accuracy."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    probe = nn.Linear(x_train.shape[1], num_classes)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x_train), y_train) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (probe(x_val).argmax(1) == y_val).float().mean().item()


@torch.no_grad()
def evaluate_tokenizer(tokenizer, teacher, loader, device, dtype="float32", reduce=lambda t: t, grid_png=None):
    """Held-out PSNR and SSIM, codebook usage and perplexity (over all tokens, and per scale: a scale
    of side s can hit at most images * s^2 codes), semantic cosine to the teacher and, with a toy
    teacher, how often it classifies the reconstructions right (recon_acc). The tokens go through
    the real path (encode -> ids -> decode). reduce sums a tensor over ranks (train.py's all_sum
    under torchrun, each rank with its share of the loader). grid_png (None: no image) shows the first
    two held-out images of each class (at most 16 classes) above their reconstructions."""
    tokenizer.eval()
    cfg, has_sem, has_head = tokenizer.cfg, tokenizer.sem_dec is not None, teacher.head is not None
    sums = dict.fromkeys(["images", "psnr", "ssim", "sem_cos", "recon_acc"], 0.0)
    counts = torch.zeros(len(cfg.scales), cfg.codebook_size, device=device)  # code histogram per scale
    shown = {}  # class -> [(image, reconstruction)] for the grid
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast_ctx(device, dtype):
            idx = tokenizer.encode(x)
            f_hat = tokenizer.indices_to_features(idx)
            x_rec = tokenizer.pixel_decode(f_hat).clamp(-1, 1)
            if has_sem:
                sem = tokenizer.semantic_decode(f_hat).float()
                sums["sem_cos"] += F.cosine_similarity(sem, teacher.features(x).float(), dim=-1).mean(1).sum().item()
            if has_head:
                sums["recon_acc"] += (teacher(x_rec).argmax(1) == y).sum().item()
        if grid_png:
            keep_class_examples(shown, y.cpu(), x.cpu(), x_rec.float().cpu())
        sums["images"] += len(x)
        sums["psnr"] += tf.psnr(x_rec, x).clamp_max(100).sum().item()  # an exact copy is inf dB: keep the mean finite
        sums["ssim"] += ssim(x_rec, x).sum().item()
        for k, ids in enumerate(idx.split([s * s for s in cfg.scales], dim=1)):
            counts[k] += torch.bincount(ids.flatten(), minlength=cfg.codebook_size)
    if grid_png:
        save_grid(class_rows(shown), grid_png)
    totals = dict(zip(sums, reduce(torch.tensor(list(sums.values()), dtype=torch.float64)).tolist()))
    counts = reduce(counts)
    usage, perplexity = tf.codebook_usage(counts.sum(0))
    per_scale = [tf.codebook_usage(c) for c in counts]
    kept = ["psnr", "ssim"] + ["sem_cos"] * has_sem + ["recon_acc"] * has_head
    return {**{k: totals[k] / totals["images"] for k in kept}, "usage": usage.item(), "perplexity": perplexity.item(),
            "usage_per_scale": [round(u.item(), 4) for u, _ in per_scale],
            "perplexity_per_scale": [round(p.item(), 2) for _, p in per_scale]}


@torch.no_grad()
def evaluate_teacher(teacher, loader, device, dtype="float32", reduce=lambda t: t):
    """The teacher's held-out class accuracy -> {"acc": ...}; reduce sums over ranks."""
    teacher.eval()
    correct = seen = 0
    for x, y in loader:
        with autocast_ctx(device, dtype):
            correct += (teacher(x.to(device)).argmax(1).cpu() == y).sum().item()
        seen += len(y)
    correct, seen = reduce(torch.tensor([correct, seen], dtype=torch.float64)).tolist()
    return {"acc": correct / seen}


@torch.no_grad()
def reconstructions(tokenizer, loader, device, dtype="float32"):
    """Every image of a loader through encode -> ids -> decode -> (images, reconstructions, labels),
    on the CPU, images in [-1, 1]."""
    tokenizer.eval()
    xs, recs, ys = [], [], []
    for x, y in loader:
        with autocast_ctx(device, dtype):
            recs.append(tokenizer.decode(tokenizer.encode(x.to(device))).float().clamp(-1, 1).cpu())
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(recs), torch.cat(ys)


@torch.no_grad()
def evaluate_judge(judge, tokenizer, loader, device, dtype="float32", reduce=lambda t: t):
    """The judge on held-out images (acc) and on their reconstructions (recon_class_acc: the most a
    generator can score through this tokenizer's decoder); reduce sums over ranks."""
    judge.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # right on the images, right on the reconstructions, images
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast_ctx(device, dtype):
            x_rec = tokenizer.decode(tokenizer.encode(x)).clamp(-1, 1)
            sums += torch.tensor([(judge(x).argmax(1) == y).sum().item(), (judge(x_rec).argmax(1) == y).sum().item(),
                                  len(y)], dtype=torch.float64)
    right, right_rec, n = reduce(sums).tolist()
    return {"acc": right / n, "recon_class_acc": right_rec / n}


@torch.no_grad()
def evaluate_gpt(gpt, loader, device, dtype="float32", reduce=lambda t: t):
    """Held-out next-token loss (nats) and token accuracy, overall and per scale, of a GPT on a loader
    of (ids (B, L), labels (B,)); reduce sums over ranks."""
    gpt.eval()
    S, level = len(gpt.scales), gpt.level.cpu()
    loss, hits, counts = (torch.zeros(n, dtype=torch.float64) for n in (1, S, S))  # sums
    for idx, y in loader:
        idx, y = idx.to(device), y.to(device)
        with autocast_ctx(device, dtype):
            logits = gpt(idx, y)  # (B, L, K)
        loss += F.cross_entropy(logits.flatten(0, 1).float(), idx.flatten(), reduction="sum").item()
        correct = (logits.argmax(-1) == idx).double().sum(0).cpu()  # (L,)
        hits.index_add_(0, level, correct)
        counts.index_add_(0, level, torch.full_like(correct, len(idx)))
    loss, hits, counts = reduce(torch.cat([loss, hits, counts])).split([1, S, S])
    return {"loss": (loss / counts.sum()).item(), "acc": (hits.sum() / counts.sum()).item(),
            "acc_per_scale": [round(a, 4) for a in (hits / counts).tolist()]}


@torch.no_grad()
def score_generated(gpt, tokenizer, teacher, judge, labels, batch_size, seed, device, dtype="float32", shapes=False,
                    **options):
    """Samples for labels (N,) (generated_batches, options as GPT.generate's) scored -> (row, mean-pooled
    teacher features (N, T), judge features (N, F) or None). row: class_acc, how often the judge
    reads the requested class in the image (and class_acc_per_class); teacher_class_acc, the same
    for the toy teacher; sem_class_acc, the teacher's head on the semantic features decoded from
    the same ids (do the ids carry the class?); on shapes, colours: colour_coverage of the samples."""
    right, feats, judged, colours = {}, [], [], []
    for y, ids, x in generated_batches(gpt, tokenizer, labels, batch_size, seed, device, dtype, **options):
        f = teacher.features(x).float().mean(1)  # (b, T)
        feats.append(f.cpu())
        heads = {}
        if judge is not None:  # (in eval mode: its callers load it so)
            j = judge.features(x).float()  # (b, F)
            judged.append(j.cpu())
            heads["class_acc"] = judge.head(j)
        if teacher.head is not None:
            heads["teacher_class_acc"] = teacher.head(f)
            if tokenizer.sem_dec is not None:
                heads["sem_class_acc"] = teacher.head(tokenizer.semantic_features(ids).float().mean(1))
        for name, logits in heads.items():
            right.setdefault(name, []).append((logits.argmax(1) == y).cpu())
        if shapes:
            colours.append(foreground_colours(x.cpu()))
    right, labels = {k: torch.cat(v).float() for k, v in right.items()}, labels.cpu()
    row = {k: v.mean().item() for k, v in right.items()}
    if judge is not None:
        row["class_acc_per_class"] = [round(right["class_acc"][labels == c].mean().item(), 4)
                                      for c in labels.unique().tolist()]
    if shapes:
        row["colours"] = colour_coverage(torch.cat(colours), labels)
    return row, torch.cat(feats), torch.cat(judged) if judged else None


def generated_row(gpt, tokenizer, teacher, judge, labels, batch_size, seed, device, dtype="float32", shapes=False,
                  recon_class_acc=None):
    """The training run's last row: score_generated at the default guidance and at 0 (keys with the
    suffix _cfg0), beside recon_class_acc (the judge's ceiling through this decoder) when given."""
    row = {"cfg": DEFAULT_CFG_SCALE, "images": len(labels),
           **({"recon_class_acc": recon_class_acc} if recon_class_acc is not None else {})}
    for cfg_scale in (DEFAULT_CFG_SCALE, 0.0):
        scores, _, _ = score_generated(gpt, tokenizer, teacher, judge, labels, batch_size, seed, device, dtype,
                                       shapes=shapes, cfg_scale=cfg_scale)
        row.update({k if cfg_scale == DEFAULT_CFG_SCALE else f"{k}_cfg0": v for k, v in scores.items()
                    if cfg_scale == DEFAULT_CFG_SCALE or k != "class_acc_per_class"})
    return row


# ---------------------------------------------------------------------------------------------
# Features: generated images, the teacher's view, the probe's inputs


@torch.no_grad()
def generated_batches(gpt, tokenizer, labels, batch_size, seed, device, dtype, **options):
    """Sample ids for labels (N,) in batches from one seeded generator -> yields (labels (b,),
    ids (b, L), images (b, 3, H, W) in [-1, 1])."""
    g = torch.Generator(device).manual_seed(seed)
    for y in labels.to(device).split(batch_size):
        with autocast_ctx(device, dtype):
            ids = gpt.generate(y, generator=g, **options)
            x = tokenizer.decode(ids).float()
        yield y, ids, x


@torch.no_grad()
def code_features(tokenizer, teacher, dataset, pool, batch_size, device, dtype):
    """The probe's inputs for every image of a dataset -> ({kind: (N, d)}, labels (N,)). Kinds: the
    semantic and the pixel half of the quantized codes (ids -> codes, the real path), both together,
    and the continuous teacher features; each (B, d, n, n) map mean-pooled over the grid
    (pool 'mean') or flattened, position by position (pool 'grid')."""
    sem_dim, pix_dim, n = tokenizer.cfg.sem_dim, tokenizer.cfg.pix_dim, tokenizer.cfg.grid
    flat = (lambda f: f.mean((2, 3))) if pool == "mean" else (lambda f: f.flatten(1))
    feats, labels = {}, []
    for x, y in eval_loader(dataset, batch_size):
        x = x.to(device)
        with autocast_ctx(device, dtype):
            f = tokenizer.indices_to_features(tokenizer.encode(x)).float()  # (B, C, n, n)
            t = teacher.features(x).float().transpose(1, 2).unflatten(2, (n, n))  # (B, T, n, n)
        kinds = {"semantic": f[:, :sem_dim] if sem_dim else None, "pixel": f[:, sem_dim:] if pix_dim else None,
                 "both": f if sem_dim and pix_dim else None, "teacher": t}
        for kind, v in kinds.items():
            if v is not None:
                feats.setdefault(kind, []).append(flat(v).cpu())
        labels.append(y)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


# ---------------------------------------------------------------------------------------------
# The commands


def get_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    args.refine = parse_refine(p, args.refine)
    check_numbers(p, args, {**SAMPLING_NUMBERS, **{name: (lambda v: v >= 1, ">= 1") for name in
                                         ("eval_images", "num_images", "probe_images", "batch_size", "k")}})
    if (args.ref or args.recon) and args.mode != "export":
        p.error("--ref and --recon choose what export writes; use them with export")
    if args.pool != "mean" and args.mode not in ("probe", "neighbours"):
        p.error("--pool is for probe and neighbours")
    if args.teacher not in (None, "toy", "clip-vit-b16"):
        check_input_file(p, "--teacher", args.teacher)
    check_folder(p, "--out-dir", args.out_dir)  # (a missing --tokenizer file gets the command that makes it, later)
    check_output_file(p, "--out", args.out, IMAGE_OUTPUTS if args.mode == "neighbours" else (".npz",))
    check_device(p, args.device)
    return args


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="eval", choices=["eval", "probe", "neighbours", "export"])
    p.add_argument("--out-dir", default="out", help="where train.py wrote tokenizer.pt, gpt.pt and teacher.pt")
    p.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: OUT_DIR/tokenizer.pt)")
    p.add_argument("--out", default=None, help="export: output file (default: OUT_DIR/samples.npz, "
                   "reference.npz or reconstructions.npz); neighbours: the picture (default: OUT_DIR/neighbours.png)")
    # the held-out split of the tokenizer's dataset, as train.py builds it
    p.add_argument("--teacher", default=None, help="'toy' (OUT_DIR/teacher.pt), 'clip-vit-b16' or a path, as "
                   "train.py --teacher (default: the tokenizer's)")
    p.add_argument("--dataset", default=None, choices=DATASETS, help="default: the tokenizer's (its checkpoint says)")
    p.add_argument("--data-path", default=None, help="root of a folder dataset (default: the tokenizer's)")
    p.add_argument("--eval-images", type=int, default=EVAL_IMAGES, help="held-out images for eval and probe")
    p.add_argument("--num-images", type=int, default=None, help="generated images for eval (default: "
                   "--eval-images) and export (default: 50,000); real held-out images for export --ref")
    p.add_argument("--probe-images", type=int, default=4096, help="training images the probes fit")
    p.add_argument("--pool", default="mean", choices=["mean", "grid"], help="probe and neighbours features: mean "
                   "over the token grid, or the whole grid flattened (keeps where things are; n*n times wider: toy sizes)")
    p.add_argument("--k", type=int, default=5, help="neighbours: nearest held-out images per query")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--ref", action="store_true", help="export real centre-cropped held-out images instead")
    what.add_argument("--recon", action="store_true", help="export the tokenizer's reconstructions of them instead")
    p.add_argument("--batch-size", type=int, default=256, help="images per generation or encoding batch")
    # generation (eval, export): GPT.generate's defaults, as sample.py
    p.add_argument("--cfg-scale", type=float, default=DEFAULT_CFG_SCALE, help="guidance weight of the guided row; eval "
                   "also measures cfg 0")
    p.add_argument("--cfg-schedule", default=SAMPLING["cfg_schedule"], choices=["linear", "constant"])
    p.add_argument("--temperature", type=float, default=SAMPLING["temperature"], help="softmax temperature (> 0)")
    p.add_argument("--top-k", type=int, default=SAMPLING["top_k"], help="sample from the k most likely ids; 0 = all")
    p.add_argument("--top-p", type=float, default=SAMPLING["top_p"], help="nucleus sampling mass; 0 = off")
    p.add_argument("--refine", nargs="+", default=None, metavar="TOP_K,TOP_P", help="multi-step sampling, as sample.py")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype of the forward passes")
    return p


class Run:
    """What every command reads: the tokenizer, and the teacher, data and seed it was trained with
    (its checkpoint names them; flags override)."""

    def __init__(self, args):
        self.args, path = args, args.tokenizer or os.path.join(args.out_dir, "tokenizer.pt")
        tokenizer, ckpt = load_model(path, "tokenizer")
        self.tokenizer, self.tokenizer_path = tokenizer.to(args.device).eval(), path
        trained = ckpt.get("args", {})
        self.dataset = args.dataset or trained.get("dataset", "shapes")
        same = self.dataset == trained.get("dataset")
        self.data_path = args.data_path or (trained.get("data_path") if same else None)
        self.seed = trained.get("seed", 0) if same else 0  # the shapes held-out split depends on it
        self.classes = ckpt.get("classes") if same else None  # what a label means in this run
        self.teacher_name = args.teacher or trained.get("teacher", "toy")

    def data(self, split, size, augment=False):
        data = make_dataset(self.dataset, resolve_data_path(self.dataset, self.data_path), split,
                            self.tokenizer.cfg.image_size, size, self.seed, augment, cache_dir=self.args.out_dir)
        check_classes(data.classes, self.classes, f"the {split} split of {self.data_path or self.dataset}",
                      f"evaluate {self.tokenizer_path} on the data it was trained on")
        return data

    def teacher(self):
        path = teacher_path(self.teacher_name, self.args.out_dir)
        return load_teacher(path, self.tokenizer.cfg, self.teacher_name != "toy", self.classes).to(self.args.device)

    def gpt(self):
        path = os.path.join(self.args.out_dir, "gpt.pt")
        gpt, _ = load_model(path, "gpt", self.tokenizer, self.classes, f"give the GPT of {self.tokenizer_path}'s run")
        return gpt.to(self.args.device).eval()

    def judge(self):
        """OUT_DIR/judge.pt (train.py --stage judge), or None where the run has none."""
        path = os.path.join(self.args.out_dir, "judge.pt")
        if not os.path.exists(path):
            return None
        judge, _ = load_model(path, "judge", classes=self.classes, fix=f"give the judge of {self.tokenizer_path}'s run")
        return judge.to(self.args.device).eval()

    def sampling(self, cfg_scale):
        """GPT.generate's options from the flags, at guidance weight cfg_scale."""
        a = self.args
        return dict(cfg_scale=cfg_scale, cfg_schedule=a.cfg_schedule, temperature=a.temperature, top_k=a.top_k,
                    top_p=a.top_p, refine=a.refine)

    def samples(self, gpt, n, cfg_scale):
        """n class-balanced samples at guidance weight cfg_scale, in batches -> (labels, ids, images)."""
        a = self.args
        return generated_batches(gpt, self.tokenizer, torch.arange(n) % gpt.cfg.num_classes, a.batch_size, a.seed,
                                 a.device, a.dtype, **self.sampling(cfg_scale))

    def log(self, rows):
        with open(os.path.join(self.args.out_dir, "metrics.jsonl"), "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def print_table(rows, columns):
    print(" | ".join(f"{c:>14}" for c in columns))
    for row in rows:
        print(" | ".join(f"{row[c]:>14.4g}" if isinstance(row.get(c), float) else f"{str(row.get(c, '-')):>14}"
                         for c in columns))


def evaluate(run):
    """The tokenizer on the held-out split (evaluate_tokenizer; with OUT_DIR/judge.pt also
    recon_class_acc); then, if OUT_DIR/gpt.pt exists, --num-images class-balanced samples at cfg 0
    and at --cfg-scale, scored by score_generated, with FD-teacher and FD-judge against the held-out
    images and their floors (fd_*_real: as many real training images, what a perfect generator
    scores at this sample size)."""
    a, teacher, judge = run.args, run.teacher(), run.judge()
    val = run.data("val", a.eval_images)
    rows = [{"stage": "eval", "split": "val", "tokenizer": run.tokenizer_path,
             **evaluate_tokenizer(run.tokenizer, teacher, eval_loader(val, 128), a.device, a.dtype)}]
    if teacher.head is not None:  # the toy teacher on the real images: what recon_acc compares with
        rows[0]["teacher_acc"] = evaluate_teacher(teacher, eval_loader(val, 128), a.device, a.dtype)["acc"]
    if judge is not None:
        rows[0].update({"judge_acc" if k == "acc" else k: v for k, v in
                        evaluate_judge(judge, run.tokenizer, eval_loader(val, 128), a.device, a.dtype).items()})
    if os.path.exists(os.path.join(a.out_dir, "gpt.pt")):
        gpt, n = run.gpt(), a.num_images or a.eval_images
        real, floor = features_and_floor(run, teacher, judge, val, n)
        for cfg_scale in dict.fromkeys((0.0, a.cfg_scale)):
            scores, *fake = score_generated(gpt, run.tokenizer, teacher, judge, torch.arange(n) % gpt.cfg.num_classes,
                                            a.batch_size, a.seed, a.device, a.dtype,
                                            shapes=isinstance(val, ShapesDataset), **run.sampling(cfg_scale))
            fd = {f"fd_{k}": frechet_distance(f, real[k]) for k, f in zip(("teacher", "judge"), fake) if f is not None}
            rows.append({"stage": "eval", "split": "generated", "cfg": cfg_scale, "images": n, **scores, **fd, **floor})
    else:
        print(f"no {a.out_dir}/gpt.pt: the tokenizer only")
    run.log(rows)
    names = ["held-out"] + [f"generated cfg {row['cfg']:g}" for row in rows[1:]]
    keys = dict.fromkeys(k for row in rows for k in row if k not in ("stage", "split", "tokenizer", "cfg")
                         and not isinstance(row[k], list))
    print_table([{"metric": k, **{name: row.get(k, "-") for name, row in zip(names, rows)}} for k in keys],
                ["metric", *names])
    return rows


@torch.no_grad()
def features_and_floor(run, teacher, judge, val, n):
    """Teacher (and judge) features of the held-out images -> ({"teacher": (N, T), "judge": (N, F)},
    {"fd_teacher_real": ..., "fd_judge_real": ...}): the FD of n real training images to them."""
    a, models = run.args, {"teacher": lambda x: teacher.features(x).float().mean(1), "judge": judge and judge.features}
    feats = {}
    for split, data in (("val", val), ("train", run.data("train", n))):
        for k, f in models.items():
            if f is not None:
                with autocast_ctx(a.device, a.dtype):
                    feats[split, k] = torch.cat([f(x.to(a.device)).float().cpu() for x, _ in eval_loader(data, a.batch_size)])
    real = {k: v for (split, k), v in feats.items() if split == "val"}
    return real, {f"fd_{k}_real": frechet_distance(feats["train", k], v) for k, v in real.items()}


def probe(run):
    """Linear probes on pooled features (see code_features): the class and, on shapes, the foreground
    colour, fit on --probe-images training images, scored on the held-out split."""
    a, teacher = run.args, run.teacher()
    fit_set, val_set = run.data("train", a.probe_images), run.data("val", a.eval_images)
    (fit, fit_y), (val, val_y) = (code_features(run.tokenizer, teacher, d, a.pool, a.batch_size, a.device, a.dtype)
                                  for d in (fit_set, val_set))
    targets = {"class": (fit_y, val_y, val_set.num_classes)}
    if isinstance(val_set, ShapesDataset):  # appearance, drawn independently of the class
        colour = [d.params(range(len(d)))["colour"].long() for d in (fit_set, val_set)]
        targets["colour"] = (*colour, len(PALETTE))
    rows = []
    for kind in fit:
        row = {"stage": "probe", "features": kind, "pool": a.pool, "dim": fit[kind].shape[1]}
        for target, (y_fit, y_val, k) in targets.items():
            row[f"{target}_acc"] = linear_probe(*(t.to(a.device) for t in (fit[kind], y_fit, val[kind], y_val)), k)
        rows.append({**row, "fit_images": len(fit_y), "val_images": len(val_y)})
        run.log(rows[-1:])
    print_table(rows, ["features", "pool", "dim"] + [f"{t}_acc" for t in targets])
    return rows


def nearest_neighbours(feats_ND, k):
    """The k rows most cosine-similar to each row, among the other rows -> (N, k) indices, nearest
    first; a row is never its own neighbour."""
    u = F.normalize(feats_ND.float(), dim=1)
    sims = u @ u.T  # (N, N)
    sims.fill_diagonal_(-float("inf"))
    return sims.topk(k, dim=1).indices


def precision_at_k(neighbours_Nk, labels_N):
    """The fraction of the neighbours that share their query's label, over all queries."""
    return (labels_N[neighbours_Nk] == labels_N[:, None]).float().mean().item()


def neighbours(run):
    """What each half of a shared id knows: every held-out image's --k nearest held-out images by the
    semantic half of its codes and by the pixel half (code_features, cosine similarity) -> one row:
    precision@k of the same class and, on shapes, the same colour; and a picture: for the first
    image of each class (at most 8), the query | its semantic neighbours | its pixel neighbours."""
    a, teacher = run.args, run.teacher()
    val = run.data("val", a.eval_images)
    if a.k >= len(val):
        raise ValueError(f"--k {a.k} needs more held-out images than that; the split has {len(val)}: lower --k "
                         "or raise --eval-images")
    feats, y = code_features(run.tokenizer, teacher, val, a.pool, a.batch_size, a.device, a.dtype)
    targets = {"class": y}
    if isinstance(val, ShapesDataset):  # appearance, drawn independently of the class
        targets["colour"] = val.params(range(len(val)))["colour"].long()
    row, found = {"stage": "neighbours", "pool": a.pool, "k": a.k, "images": len(y)}, {}
    for half, key in (("semantic", "sem"), ("pixel", "pix")):
        if half in feats:  # (a tokenizer of one half: the other is missing)
            found[half] = nearest_neighbours(feats[half], a.k)
            row.update({f"nn_{t}_prec_{key}": precision_at_k(found[half], labels) for t, labels in targets.items()})
    queries = [int((y == c).nonzero()[0]) for c in y.unique()[:8].tolist()]
    image = lambda i: val[i][0]
    blank = torch.ones_like(image(0))  # a white tile between the groups
    rows = [torch.stack([image(q)] + [t for half in found for t in [blank] + [image(i) for i in found[half][q]]])
            for q in queries]
    header = ["query"] + [t for half in found for t in ["", f"{half} half: {a.k} nearest"] + [""] * (a.k - 1)]
    out = a.out or os.path.join(a.out_dir, "neighbours.png")
    save_grid(rows, out, header=header)
    run.log([row])
    print_table([row], [k for k in row if k.startswith("nn_")] + ["k", "pool", "images"])
    print(f"wrote {out}: one row per query ({', '.join(val.classes[y[q]] for q in queries)})")
    return row


def export(run):
    """N class-balanced generated images or, with --ref, N real centre-cropped held-out images (with
    --recon, their reconstructions) as uint8 (N, H, W, 3) under arr_0, labels under arr_1: the .npz
    layout of the ADM evaluation suite (Dhariwal & Nichol 2021,
    https://github.com/openai/guided-diffusion/tree/main/evaluations), which VAR and LlamaGen report
    FID and IS with."""
    a, tokenizer = run.args, run.tokenizer
    n, size = a.num_images or 50_000, tokenizer.cfg.image_size
    images, labels = np.empty((n, size, size, 3), np.uint8), np.empty(n, np.int64)
    if a.ref or a.recon:
        dataset = run.data("val", n)
        if len(dataset) < n:
            raise ValueError(f"the held-out split has {len(dataset)} images; ask for --num-images {len(dataset)} or fewer")
        batches = ((y, x.to(a.device)) for x, y in eval_loader(dataset, a.batch_size))
        if a.recon:
            batches = ((y, tokenizer.decode(tokenizer.encode(x))) for y, x in batches)
    else:
        batches = ((y, x) for y, _, x in run.samples(run.gpt(), n, a.cfg_scale))
    start = 0
    for y, x in batches:
        images[start:start + len(x)], labels[start:start + len(x)] = to_uint8(x), y.cpu().numpy()
        start += len(x)
    name = "reference.npz" if a.ref else "reconstructions.npz" if a.recon else "samples.npz"
    out = a.out or os.path.join(a.out_dir, name)
    save_atomically(out, lambda f: np.savez(f, arr_0=images, arr_1=labels))
    kind = "real held-out" if a.ref else "reconstructed held-out" if a.recon else "generated"
    print(f"wrote {out}: arr_0 {images.shape} uint8 ({kind} images), arr_1 labels")
    return out


@torch.no_grad()
def main(argv=None):
    args = get_args(argv)
    return {"eval": evaluate, "probe": probe, "neighbours": neighbours, "export": export}[args.mode](Run(args))


def cli(argv=None):
    """The command line: bad input ends in one line and exit code 2."""
    return run_script(main, argv)


if __name__ == "__main__":
    cli()
