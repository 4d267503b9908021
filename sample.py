"""
Generate images with a trained TokenFlow GPT, use the tokenizer on its own, or evaluate both.

    python sample.py                                   # one row per class -> out/samples.png
    python sample.py --classes 0 3 --per-class 16 --cfg 4 --top-k 100 --top-p 0.9
    python sample.py --top-k 300 --top-p 0.8 --refine 100,0.8 1,0   # TokenFlow's multi-step sampling
    python sample.py reconstruct a.png b.jpg           # reconstruction grid + per-image PSNR
    python sample.py encode a.png b.png --out ids.npy  # shared ids (N, L) to a .npy file
    python sample.py decode ids.npy --out decoded.png  # and back to images
    python sample.py eval                              # held-out PSNR, SSIM, usage, ...; class_acc, FD-teacher
    python sample.py probe                             # linear probes on each half of the codes
    python sample.py export --num-images 50000         # out/samples.npz for the ADM evaluation suite (gFID, IS)
    python sample.py export --ref --num-images 50000   # out/reference.npz: real held-out images
    python sample.py export --recon --num-images 50000 # out/reconstructions.npz: the same, reconstructed (rFID)

Models are rebuilt from out/tokenizer.pt and out/gpt.pt alone (config + weights); eval, probe and
export --ref/--recon also read the teacher and the data the tokenizer was trained with (its checkpoint
names them; --teacher, --dataset and --data-path override).
"""

import argparse
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import tokenflow as tf
import train
from train import BAD_IMAGE, EVAL_IMAGES, ShapesDataset, psnr, read_rgb, run_script, save_grid, tokenizer_id


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="generate",
                   choices=["generate", "reconstruct", "encode", "decode", "eval", "probe", "export"])
    p.add_argument("inputs", nargs="*", help="reconstruct/encode: image files (reconstruct without files: "
                   "held-out shapes); decode: one .npy file of ids (N, L)")
    p.add_argument("--out-dir", default="out", help="where train.py wrote tokenizer.pt and gpt.pt")
    p.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: OUT_DIR/tokenizer.pt; "
                   "OUT_DIR/decoder.pt after train.py --finetune-decoder: the same ids, its own pixel decoder)")
    p.add_argument("--out", default=None, help="output file (default: OUT_DIR/samples.png, reconstructions_"
                   "sample.png, ids.npy, decoded.png, samples.npz, reference.npz or reconstructions.npz)")
    # eval, probe, export: the held-out split of the tokenizer's dataset, as train.py builds it
    p.add_argument("--teacher", default=None, help="eval, probe: 'toy' (OUT_DIR/teacher.pt), 'clip-vit-b16' or a "
                   "path, as train.py --teacher (default: the tokenizer's)")
    p.add_argument("--dataset", default=None, choices=["shapes", "folder", "imagenet", "cifar10"],
                   help="default: the one the tokenizer was trained on (its checkpoint says)")
    p.add_argument("--data-path", default=None, help="root of a folder dataset (default: the tokenizer's)")
    p.add_argument("--eval-images", type=int, default=EVAL_IMAGES, help="held-out images for eval and probe")
    p.add_argument("--num-images", type=int, default=None, help="generated images for eval (default: "
                   "--eval-images) and export (default: 50,000); real held-out images for export --ref")
    p.add_argument("--probe-images", type=int, default=4096, help="training images the probes fit")
    p.add_argument("--pool", default="mean", choices=["mean", "grid"], help="probe features: mean over the token "
                   "grid, or the whole grid flattened (keeps where things are; n*n times wider: toy sizes)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--ref", action="store_true", help="export real centre-cropped held-out images instead")
    what.add_argument("--recon", action="store_true", help="export the tokenizer's reconstructions of them instead")
    p.add_argument("--batch-size", type=int, default=256, help="images per generation or encoding batch")
    # generation: unset sampling flags take GPT.generate's defaults (tokenflow.py)
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class ids, one grid row each (default: all); the id num_classes is the null class")
    p.add_argument("--per-class", type=int, default=8, help="images per class")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance weight; 0 = none")
    p.add_argument("--cfg-schedule", default=None, choices=["linear", "constant"],
                   help="linear: the weight ramps from 0 at the first scale to --cfg at the last (official)")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature (> 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely ids; 0 = all")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1); 0 = off")
    p.add_argument("--refine", nargs="+", default=None, metavar="TOP_K,TOP_P",
                   help="multi-step sampling: re-predict each scale once per pair (paper: 100,0.8 1,0)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler: the same seed gives the same images")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype of the forward passes of eval, probe and export")
    args = p.parse_args(argv)
    try:
        args.refine = [(int(k), float(q)) for k, q in (pair.split(",") for pair in args.refine or [])] or None
    except ValueError:
        p.error(f"--refine takes TOP_K,TOP_P pairs such as 100,0.8 1,0; got {' '.join(args.refine)}")
    if args.per_class < 1 or (args.temperature is not None and args.temperature <= 0):
        p.error("--per-class must be >= 1 and --temperature > 0")
    for name in ("eval_images", "num_images", "probe_images", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    filters = [(args.top_k or 0, args.top_p or 0)] + (args.refine or [])
    if any(k < 0 or not 0 <= q <= 1 for k, q in filters):
        p.error("top-k values must be >= 0 (0 = off) and top-p values in [0, 1] (0 = off)")
    if args.mode == "decode" and len(args.inputs) != 1:
        p.error("decode takes exactly one .npy file of ids")
    if args.mode == "encode" and not args.inputs:
        p.error("encode takes one or more image files")
    if (args.ref or args.recon) and args.mode != "export":
        p.error("--ref and --recon choose what export writes; use them with export")
    if args.pool != "mean" and args.mode != "probe":
        p.error("--pool is for probe")
    return args


def load_images(paths, size):
    """Image files -> (N, 3, size, size) in [-1, 1]: RGB, centre-cropped to a square, resized."""
    out = []
    for path in paths:
        try:
            img = read_rgb(path)
        except BAD_IMAGE as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
    return torch.stack(out)


def sampling_options(args):
    """The sampling flags given on the command line; unset ones take GPT.generate's defaults."""
    return {k: getattr(args, k) for k in ("cfg", "cfg_schedule", "temperature", "top_k", "top_p", "refine")
            if getattr(args, k) is not None}


def load_gpt(args, tokenizer):
    gpt, ckpt = tf.load_model(os.path.join(args.out_dir, "gpt.pt"), "gpt", tokenizer)
    if ckpt["tokenizer_id"] != tokenizer_id(tokenizer):  # same sizes, other weights: other ids
        raise ValueError(f"{args.out_dir}/gpt.pt was trained on another tokenizer's ids than "
                         f"{args.out_dir}/tokenizer.pt; retrain it (python train.py --stage gpt)")
    return gpt.to(args.device).eval()


@torch.no_grad()
def generated_batches(args, gpt, tokenizer, labels, **options):
    """Sample ids for labels (N,) in batches of --batch-size from one seeded generator -> yields
    (labels (b,), ids (b, L), images (b, 3, H, W) in [-1, 1])."""
    g = torch.Generator(args.device).manual_seed(args.seed)
    for y in labels.to(args.device).split(args.batch_size):
        with train.autocast_ctx(args):
            ids = gpt.generate(y, generator=g, **options)
            x = tokenizer.decode(ids).float()
        yield y, ids, x


def to_uint8(x_B3HW):
    """[-1, 1] images -> (B, H, W, 3) uint8 numpy, the layout image files and the ADM suite use."""
    return ((x_B3HW.float() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Evaluation: Frechet distance in the teacher's feature space, linear probes


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

    opt.step(closure)
    with torch.no_grad():
        return (probe(x_val).argmax(1) == y_val).float().mean().item()


@torch.no_grad()
def teacher_features(args, teacher, dataset):
    """Mean-pooled teacher features (N, T) and labels (N,) of a dataset, in order."""
    feats, labels = [], []
    for x, y in train.eval_loader(dataset, args.batch_size):
        with train.autocast_ctx(args):
            feats.append(teacher.features(x.to(args.device)).float().mean(1).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def code_features(args, tokenizer, teacher, dataset):
    """The probe's inputs for every image of a dataset -> ({kind: (N, d)}, labels (N,)). Kinds: the
    semantic and the pixel half of the quantized codes (ids -> codes, the real path), both together,
    and the continuous teacher features; each (B, d, n, n) map mean-pooled over the grid
    (--pool mean) or flattened, position by position (--pool grid)."""
    sem_dim, pix_dim, n = tokenizer.cfg.sem_dim, tokenizer.cfg.pix_dim, tokenizer.cfg.grid
    pool = (lambda f: f.mean((2, 3))) if args.pool == "mean" else (lambda f: f.flatten(1))
    feats, labels = {}, []
    for x, y in train.eval_loader(dataset, args.batch_size):
        x = x.to(args.device)
        with train.autocast_ctx(args):
            f = tokenizer.indices_to_features(tokenizer.encode(x)).float()  # (B, C, n, n)
            t = teacher.features(x).float().transpose(1, 2).unflatten(2, (n, n))  # (B, T, n, n)
        kinds = {"semantic": f[:, :sem_dim] if sem_dim else None, "pixel": f[:, sem_dim:] if pix_dim else None,
                 "both": f if sem_dim and pix_dim else None, "teacher": t}
        for kind, v in kinds.items():
            if v is not None:
                feats.setdefault(kind, []).append(pool(v).cpu())
        labels.append(y)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


def print_table(rows, columns):
    print(" | ".join(f"{c:>14}" for c in columns))
    for row in rows:
        print(" | ".join(f"{row[c]:>14.4g}" if isinstance(row.get(c), float) else f"{str(row.get(c, '-')):>14}"
                         for c in columns))


# ---------------------------------------------------------------------------------------------
# The modes


def data_view(args, ckpt):
    """The flags train.py's helpers read: this command's, with the teacher, dataset, data path and
    seed the tokenizer was trained with where not given (the shapes held-out split depends on the seed)."""
    trained = ckpt.get("args", {})
    view = argparse.Namespace(**vars(args), rank=0, world_size=1)
    view.teacher = args.teacher or trained.get("teacher", "toy")
    view.dataset = args.dataset or trained.get("dataset", "shapes")
    same = view.dataset == trained.get("dataset")
    view.data_path = args.data_path or (trained.get("data_path") if same else None)
    view.seed = trained.get("seed", 0) if same else 0
    if error := train.resolve_data_path(view):
        raise ValueError(error)
    return view


def generate(args, ckpt, tokenizer, out):
    gpt = load_gpt(args, tokenizer)
    classes = args.classes if args.classes is not None else list(range(gpt.cfg.num_classes))
    labels = torch.tensor(classes, device=args.device).repeat_interleave(args.per_class)
    g = torch.Generator(args.device).manual_seed(args.seed)
    x = tokenizer.decode(gpt.generate(labels, generator=g, **sampling_options(args)))
    save_grid(list(x.split(args.per_class)), out)
    print(f"wrote {out}: {len(classes)} classes x {args.per_class} images, one row per class")
    return out


def reconstruct(args, ckpt, tokenizer, out):
    if args.inputs:
        x, names = load_images(args.inputs, tokenizer.cfg.image_size), args.inputs
    else:  # the first 16 held-out images, as train.py evaluates
        held_out = train.make_dataset(data_view(args, ckpt), tokenizer.cfg, "val")
        x = next(iter(train.eval_loader(held_out, 16)))[0]
        names = [f"held-out image {i}" for i in range(len(x))]
    x_rec = tokenizer.decode(tokenizer.encode(x.to(args.device)))
    for name, db in zip(names, psnr(x_rec, x.to(args.device)).tolist()):
        print(f"{db:6.2f} dB  {name}")
    save_grid([x, x_rec], out)
    print(f"wrote {out}: originals above, reconstructions below")
    return out


def encode(args, ckpt, tokenizer, out):
    ids = tokenizer.encode(load_images(args.inputs, tokenizer.cfg.image_size).to(args.device))
    np.save(out, ids.cpu().numpy())
    print(f"wrote {out}: ids {tuple(ids.shape)} for scales {tokenizer.cfg.scales}")
    return out


def decode(args, ckpt, tokenizer, out):
    try:
        ids = np.load(args.inputs[0], allow_pickle=False)
    except (OSError, ValueError) as e:  # a PNG or a pickled array ends here: we never unpickle
        raise ValueError(f"cannot read ids from {args.inputs[0]} ({type(e).__name__}); "
                         "give a .npy file of ids (N, L)") from None
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{args.inputs[0]} holds {ids.dtype} values; token ids must be integers")
    x = tokenizer.decode(torch.from_numpy(ids.astype(np.int64)).to(args.device))
    save_grid([x], out)
    print(f"wrote {out}: {len(x)} images")
    return out


@torch.no_grad()
def generated_row(args, gpt, tokenizer, teacher, real, cfg):
    """--num-images class-balanced samples at guidance cfg -> FD-teacher against the held-out
    features `real` and, with a toy teacher, class_acc (its head on the image) and sem_class_acc
    (its head on the semantic features decoded from the same ids)."""
    n = args.num_images or args.eval_images
    labels = torch.arange(n) % gpt.cfg.num_classes
    feats, hits, sem_hits = [], 0, 0
    for y, ids, x in generated_batches(args, gpt, tokenizer, labels, **{**sampling_options(args), "cfg": cfg}):
        f = teacher.features(x).float().mean(1)  # (b, T)
        feats.append(f.cpu())
        if teacher.head is not None:
            hits += (teacher.head(f).argmax(1) == y).sum().item()
            if tokenizer.sem_dec is not None:
                sem_hits += (teacher.head(tokenizer.semantic_features(ids).float().mean(1)).argmax(1) == y).sum().item()
    row = {"stage": "eval", "split": "generated", "cfg": cfg, "images": n,
           "fd_teacher": frechet_distance(torch.cat(feats), real)}
    if teacher.head is not None:
        row["class_acc"] = hits / n
        if tokenizer.sem_dec is not None:
            row["sem_class_acc"] = sem_hits / n
    return row


def evaluate(args, ckpt, tokenizer, out):
    """The tokenizer on the held-out split (train.evaluate_tokenizer); then, if OUT_DIR/gpt.pt exists,
    generated images at cfg 0 and at the guided setting (generated_row). FD-teacher is measured in
    the teacher's feature space, the one the semantic half is trained to reproduce, so it suits these
    tokenizers more than an independent network would. fd_teacher_real is the FD of as many real
    training images: what a perfect generator scores at this sample size."""
    view = data_view(args, ckpt)
    teacher = train.load_teacher(view, tokenizer.cfg)
    rows = [{"stage": "eval", "split": "val", "tokenizer": args.tokenizer_path,
             **train.evaluate_tokenizer(view, tokenizer, teacher, grid_png=None)}]
    if os.path.exists(os.path.join(args.out_dir, "gpt.pt")):
        gpt = load_gpt(args, tokenizer)
        real, _ = teacher_features(view, teacher, train.make_dataset(view, tokenizer.cfg, "val"))
        real_train = train.make_dataset(view, tokenizer.cfg, "train", size=args.num_images or args.eval_images,
                                        augment=False)
        floor = frechet_distance(teacher_features(view, teacher, real_train)[0], real)
        for cfg in dict.fromkeys((0.0, sampling_options(args).get("cfg", train.DEFAULT_CFG))):
            rows.append({**generated_row(args, gpt, tokenizer, teacher, real, cfg), "fd_teacher_real": floor})
    else:
        print(f"no {args.out_dir}/gpt.pt: the tokenizer only")
    for row in rows:
        train.log_metrics(view, row, echo=False)
    names = ["held-out"] + [f"generated cfg {row['cfg']:g}" for row in rows[1:]]
    keys = dict.fromkeys(k for row in rows for k in row if k not in ("stage", "split", "tokenizer", "cfg"))
    print_table([{"metric": k, **{name: row.get(k, "-") for name, row in zip(names, rows)}} for k in keys],
                ["metric", *names])
    return rows


def probe(args, ckpt, tokenizer, out):
    """Linear probes on pooled features (see code_features): the class and, on shapes, the
    foreground colour, fit on --probe-images training images, scored on the held-out split."""
    view = data_view(args, ckpt)
    teacher = train.load_teacher(view, tokenizer.cfg)
    fit_set = train.make_dataset(view, tokenizer.cfg, "train", size=args.probe_images, augment=False)
    val_set = train.make_dataset(view, tokenizer.cfg, "val")
    (fit, fit_y), (val, val_y) = (code_features(view, tokenizer, teacher, d) for d in (fit_set, val_set))
    targets = {"class": (fit_y, val_y, val_set.num_classes)}
    if isinstance(val_set, ShapesDataset):  # appearance, drawn independently of the class
        colour = [d.params(range(len(d)))["colour"].long() for d in (fit_set, val_set)]
        targets["colour"] = (*colour, len(train.PALETTE))
    rows = []
    for kind in fit:
        row = {"stage": "probe", "features": kind, "pool": args.pool, "dim": fit[kind].shape[1]}
        with torch.enable_grad():  # the probes train
            for target, (y_fit, y_val, k) in targets.items():
                row[f"{target}_acc"] = linear_probe(*(t.to(args.device) for t in (fit[kind], y_fit, val[kind], y_val)), k)
        rows.append({**row, "fit_images": len(fit_y), "val_images": len(val_y)})
        train.log_metrics(view, rows[-1], echo=False)
    print_table(rows, ["features", "pool", "dim"] + [f"{t}_acc" for t in targets])
    return rows


def export(args, ckpt, tokenizer, out):
    """N class-balanced generated images or, with --ref, N real centre-cropped held-out images (with
    --recon, their reconstructions, for rFID against --ref) as uint8 (N, H, W, 3) under the key arr_0,
    labels under arr_1: the .npz layout of the ADM evaluation suite (Dhariwal & Nichol 2021,
    https://github.com/openai/guided-diffusion/tree/main/evaluations), which VAR and LlamaGen report
    FID and IS with."""
    n, size = args.num_images or 50_000, tokenizer.cfg.image_size
    images, labels = np.empty((n, size, size, 3), np.uint8), np.empty(n, np.int64)
    if args.ref or args.recon:
        view = data_view(args, ckpt)
        view.eval_images = n
        dataset = train.make_dataset(view, tokenizer.cfg, "val")
        if len(dataset) < n:
            raise ValueError(f"the held-out split has {len(dataset)} images; ask for --num-images {len(dataset)} or fewer")
        batches = ((y, x.to(args.device)) for x, y in train.eval_loader(dataset, args.batch_size))
        if args.recon:
            batches = ((y, tokenizer.decode(tokenizer.encode(x))) for y, x in batches)
    else:
        gpt = load_gpt(args, tokenizer)
        labels_n = torch.arange(n) % gpt.cfg.num_classes
        batches = ((y, x) for y, _, x in generated_batches(args, gpt, tokenizer, labels_n, **sampling_options(args)))
    start = 0
    for y, x in batches:
        images[start:start + len(x)], labels[start:start + len(x)] = to_uint8(x), y.cpu().numpy()
        start += len(x)
    train.save_atomically(out, np.savez, arr_0=images, arr_1=labels)
    kind = "real held-out" if args.ref else "reconstructed held-out" if args.recon else "generated"
    print(f"wrote {out}: arr_0 {images.shape} uint8 ({kind} images), arr_1 labels")
    return out


MODES = {"generate": (generate, "samples.png"), "reconstruct": (reconstruct, "reconstructions_sample.png"),
         "encode": (encode, "ids.npy"), "decode": (decode, "decoded.png"), "eval": (evaluate, None),
         "probe": (probe, None), "export": (export, "samples.npz")}


@torch.no_grad()
def main(argv=None):
    args = get_args(argv)
    args.tokenizer_path = args.tokenizer or os.path.join(args.out_dir, "tokenizer.pt")
    tokenizer, ckpt = tf.load_model(args.tokenizer_path, "tokenizer")
    tokenizer = tokenizer.to(args.device).eval()
    run, default_out = MODES[args.mode]
    if args.mode == "export" and (args.ref or args.recon):
        default_out = "reference.npz" if args.ref else "reconstructions.npz"
    return run(args, ckpt, tokenizer, args.out or (default_out and os.path.join(args.out_dir, default_out)))


if __name__ == "__main__":
    run_script(main)  # bad input: one line on stderr, exit code 2
