"""
Measure a trained tokenizer and GPT: four commands over the metric functions of metrics.py (which
train.py logs at its evaluations too).

    python evaluate.py                                    # held-out PSNR, SSIM, usage, ...; class_acc, FD; captions, t2i
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
diversity guard). With unified.pt (train.py --stage unified) a row of stage unified: captions of the
held-out images and text-to-image from every (colour, shape) pair, seen and held out (metrics.py's
caption_scores and t2i_scores). FD-teacher and FD-judge are Frechet distances between mean-pooled teacher
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

import json
import os

import numpy as np
import torch

from data import DATASETS, EVAL_IMAGES, eval_loader, make_dataset, resolve_data_path
from data.shapes import PALETTE, ShapesDataset
from metrics import (DEFAULT_CFG_SCALE, SAMPLING, autocast_ctx, caption_scores, code_features, evaluate_judge,
                     evaluate_teacher, evaluate_tokenizer, frechet_distance, generated_batches, linear_probe,
                     nearest_neighbours, precision_at_k, score_generated, t2i_scores)
from utils.checkpoints import load_model, save_atomically
from utils.cli import (IMAGE_OUTPUTS, SAMPLING_NUMBERS, OneLineErrors, check_classes, check_device, check_folder,
                       check_input_file, check_numbers, check_output_file, parse_refine, run_script)
from utils.grids import save_grid, to_uint8
from utils.weights import load_teacher, teacher_path


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
    p = OneLineErrors(__doc__)
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
    p.add_argument("--eval-images", type=int, default=EVAL_IMAGES, help="held-out images for eval, probe and neighbours")
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
    if os.path.exists(os.path.join(a.out_dir, "unified.pt")):
        rows.append(evaluate_unified_model(run, val, judge))
    run.log(rows)
    names = ["held-out"] + [f"generated cfg {r['cfg']:g}" if r["stage"] == "eval" else "unified" for r in rows[1:]]
    keys = dict.fromkeys(k for row in rows for k in row if k not in ("stage", "split", "tokenizer", "cfg")
                         and not isinstance(row[k], list))
    print_table([{"metric": k, **{name: row.get(k, "-") for name, row in zip(names, rows)}} for k in keys],
                ["metric", *names])
    return rows


@torch.no_grad()
def evaluate_unified_model(run, val, judge):
    """OUT_DIR/unified.pt (train.py --stage unified): captions of the held-out images, read through each half
    (caption_scores), and text-to-image from every (colour, shape) pair at --cfg-scale (t2i_scores)."""
    a, path = run.args, os.path.join(run.args.out_dir, "unified.pt")
    if not isinstance(val, ShapesDataset):
        raise ValueError(f"{path} reads captions, which only the shapes have; evaluate it with --dataset shapes")
    model = load_model(path, "unified", run.tokenizer)[0].to(a.device).eval()
    ids = torch.cat([run.tokenizer.encode(x.to(a.device)).cpu() for x, _ in eval_loader(val, 256)])
    row = {"stage": "unified", "split": "val", **caption_scores(model, ids, val.captions(range(len(val))), a.device)}
    return {**row, **(t2i_scores(model, run.tokenizer, judge, a.seed, a.device, a.dtype, a.batch_size,
                                 **run.sampling(a.cfg_scale)) if judge else {})}


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


def neighbours(run):
    """What each half of a shared id knows: every held-out image's --k nearest held-out images by the
    semantic half of its codes and by the pixel half (code_features, cosine similarity) -> one row:
    precision@k of the same class and, on shapes, the same colour; and a picture: for the first
    image of each class (at most 8), the query | its semantic neighbours | its pixel neighbours."""
    a = run.args
    val = run.data("val", a.eval_images)
    if a.k >= len(val):
        raise ValueError(f"--k {a.k} needs more held-out images than that; the split has {len(val)}: lower --k "
                         "or raise --eval-images")
    feats, y = code_features(run.tokenizer, None, val, a.pool, a.batch_size, a.device, a.dtype)
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
