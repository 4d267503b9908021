"""
Generate images with a trained TokenFlow GPT, or use the tokenizer on its own.

    python sample.py                                   # one row per class -> out/samples.png
    python sample.py --classes 0 3 --per-class 16 --cfg-scale 4 --top-k 100 --top-p 0.9
    python sample.py --top-k 300 --top-p 0.8 --refine 100,0.8 1,0   # TokenFlow's multi-step sampling
    python sample.py reconstruct a.png b.jpg           # reconstruction grid + per-image PSNR
    python sample.py encode a.png b.png --out ids.npy  # shared ids (N, L) to a .npy file
    python sample.py decode ids.npy --out decoded.png  # and back to images
    python sample.py scales                            # coarse to fine: each image from the ids of scales 1..k
    python sample.py --prompt "red star" "blue ring"   # text-to-image, one row per prompt (train.py --stage unified)
    python sample.py caption [a.png ...]               # image-to-text: held-out shapes by default -> out/captions.png

Models are rebuilt from out/tokenizer.pt and out/gpt.pt (out/unified.pt: --prompt, caption) alone
(config + weights). Evaluation
(held-out metrics, probes, export for FID) is evaluate.py.
"""

import os

import numpy as np
import torch

from data import DATASETS, eval_loader, make_dataset, resolve_data_path
from data.folders import load_images
from data.shapes import caption_ids, caption_text, held_out_pair
from metrics import psnr
from utils.checkpoints import load_model
from utils.cli import (IMAGE_OUTPUTS, SAMPLING_NUMBERS, OneLineErrors, check_device, check_folder, check_input_file,
                       check_numbers, check_output_file, listing, parse_refine, run_script)
from utils.grids import class_rows, keep_class_examples, save_grid


def get_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    check_numbers(p, args, {**SAMPLING_NUMBERS, "per_class": (lambda v: v >= 1, ">= 1")})
    args.refine = parse_refine(p, args.refine)
    if args.mode == "decode" and len(args.inputs) != 1:
        p.error("decode takes exactly one .npy file of ids")
    if args.mode == "encode" and not args.inputs:
        p.error("encode takes one or more image files")
    for path in args.inputs:
        check_input_file(p, f"{args.mode}: input file", path)
    if args.prompt is not None and (args.mode != "generate" or args.classes):
        p.error("--prompt is text-to-image: use it without a mode or --classes")
    if args.prompt is not None and not all(t.strip() for t in args.prompt):
        p.error("--prompt: an empty prompt; give words such as 'red star'")
    if args.mode in ("generate", "scales") and args.inputs:
        p.error(f"{args.mode} takes no files (got {args.inputs[0]}); did you mean reconstruct or encode?")
    check_folder(p, "--out-dir", args.out_dir)  # (a missing --tokenizer file gets the command that makes it, later)
    check_output_file(p, "--out", args.out, (".npy",) if args.mode == "encode" else IMAGE_OUTPUTS)
    check_device(p, args.device)
    return args


def parser():
    p = OneLineErrors(__doc__)
    p.add_argument("mode", nargs="?", default="generate",
                   choices=["generate", "reconstruct", "encode", "decode", "scales", "caption"])
    p.add_argument("inputs", nargs="*", help="reconstruct/encode/caption: image files (reconstruct and caption "
                   "without files: held-out shapes); decode: one .npy file of ids (N, L)")
    p.add_argument("--out-dir", default="out", help="where train.py wrote tokenizer.pt, gpt.pt and unified.pt")
    p.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: OUT_DIR/tokenizer.pt; "
                   "OUT_DIR/decoder.pt after train.py --finetune-decoder: the same ids, its own pixel decoder)")
    p.add_argument("--out", default=None, help="output file (default: OUT_DIR/samples.png, "
                   "reconstructions_sample.png, ids.npy, decoded.png or scales.png)")
    p.add_argument("--dataset", default=None, choices=DATASETS, help="reconstruct without files: the held-out "
                   "images of this dataset (default: the tokenizer's)")
    p.add_argument("--data-path", default=None, help="root of a folder dataset (default: the tokenizer's)")
    # generation: unset sampling flags take GPT.generate's defaults (tokenflow.py)
    p.add_argument("--classes", nargs="+", default=None, help="classes, one grid row each (default: all): names "
                   "(the training split's folders; a name wins over a number) or numbers, num_classes = the null class")
    p.add_argument("--prompt", nargs="+", default=None, help="captions to draw, one grid row each, from "
                   "OUT_DIR/unified.pt (shapes: '<colour> <shape>')")
    p.add_argument("--per-class", type=int, default=8, help="images per class or prompt")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance weight; 0 = none")
    p.add_argument("--cfg-schedule", default=None, choices=["linear", "constant"],
                   help="linear: the weight ramps from 0 at the first scale to --cfg-scale at the last (official)")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature (> 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely ids; 0 = all")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1); 0 = off")
    p.add_argument("--refine", nargs="+", default=None, metavar="TOP_K,TOP_P",
                   help="multi-step sampling: re-predict each scale once per pair (paper: 100,0.8 1,0)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler: the same seed gives the same images")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    return p


def sampling_options(args):
    """The sampling flags given on the command line as GPT.generate's options; unset ones take
    GPT.generate's defaults."""
    options = {k: getattr(args, k) for k in ("cfg_scale", "cfg_schedule", "temperature", "top_k", "top_p", "refine")}
    return {k: v for k, v in options.items() if v is not None}


def class_ids(wanted, names, num_classes, path):
    """--classes (names or numbers) -> class ids; names: the GPT's classes (None in a checkpoint from
    before they were saved); num_classes is the null class."""
    ids = []
    for c in wanted:
        if names and c in names:
            ids.append(names.index(c))
        elif c.isdigit() and int(c) <= num_classes:
            ids.append(int(c))
        else:
            known = f"a name ({listing(names)}) or " if names else ""
            raise ValueError(f"--classes {c!r} is not a class of {path}; give {known}a number in [0, {num_classes}], "
                             f"with {num_classes} the null class")
    return ids


def generate(args, ckpt, tokenizer, out):
    path = os.path.join(args.out_dir, "gpt.pt")
    gpt, gpt_ckpt = load_model(path, "gpt", tokenizer)
    gpt, names = gpt.to(args.device).eval(), gpt_ckpt.get("classes")
    classes = class_ids(args.classes or [], names, gpt.cfg.num_classes, path) or list(range(gpt.cfg.num_classes))
    labels = torch.tensor(classes, device=args.device).repeat_interleave(args.per_class)
    g = torch.Generator(args.device).manual_seed(args.seed)
    x = tokenizer.decode(gpt.generate(labels, generator=g, **sampling_options(args)))
    save_grid(list(x.split(args.per_class)), out)
    rows = ", ".join("null" if c == gpt.cfg.num_classes else names[c] if names else str(c) for c in classes)
    print(f"wrote {out}: {len(classes)} classes x {args.per_class} images, one row per class ({rows})")
    return out


def unified_model(args, tokenizer, ckpt):
    """OUT_DIR/unified.pt on the device, with its vocabulary; ValueError when the tokenizer's data has no captions."""
    if ckpt.get("args", {}).get("dataset", "shapes") != "shapes":
        raise ValueError(f"{args.out_dir} was trained on {ckpt['args']['dataset']}, which has no captions; "
                         "text-to-image and captions are the shapes run's (python train.py, then --stage unified)")
    model, unified_ckpt = load_model(os.path.join(args.out_dir, "unified.pt"), "unified", tokenizer)
    return model.to(args.device).eval(), unified_ckpt["vocab"], [tuple(p) for p in unified_ckpt["held_out_pairs"]]


def text_to_image(args, ckpt, tokenizer, out):
    model, vocab, held = unified_model(args, tokenizer, ckpt)
    words = torch.stack([caption_ids(t, vocab) for t in args.prompt]).to(args.device)
    x = tokenizer.decode(model.generate(words.repeat_interleave(args.per_class, 0),
                                        generator=torch.Generator(args.device).manual_seed(args.seed),
                                        **sampling_options(args)))
    unseen = held_out_pair(words.cpu(), held).tolist()
    labels = [f"{t}{' (held out)' if u else ''}" for t, u in zip(args.prompt, unseen)]
    save_grid(list(x.split(args.per_class)), out, row_labels=labels)
    print(f"wrote {out}: {len(args.prompt)} prompts x {args.per_class} images, one row per prompt ({', '.join(labels)})")
    return out


def caption(args, ckpt, tokenizer, out):
    """One caption per image (the files given, else 16 held-out shapes: one of each unseen pair, the
    transformer's held-out pairs, then eight of seen pairs), printed and written under the images."""
    model, vocab, held = unified_model(args, tokenizer, ckpt)
    if args.inputs:
        x, names = load_images(args.inputs, tokenizer.cfg.image_size), args.inputs
    else:
        data = make_dataset("shapes", None, "val", tokenizer.cfg.image_size, seed=ckpt.get("args", {}).get("seed", 0))
        words = data.captions(range(len(data)))
        unseen = [held_out_pair(words, [pair]).nonzero()[0, 0].item() for pair in held]  # one image per pair
        pick = unseen + (~held_out_pair(words, held)).nonzero()[:8, 0].tolist()
        x, names = torch.stack([data[i][0] for i in pick]), [f"val image {i}: {caption_text(words[i], vocab)}"
                                                            f"{' (unseen pair)' if i in unseen else ''}" for i in pick]
    said = [caption_text(w, vocab) for w in model.caption(tokenizer.encode(x.to(args.device))).cpu()]
    for name, text in zip(names, said):
        print(f"{text:20s} {name}")
    save_grid(list(x.split(8)), out, captions=[said[i:i + 8] for i in range(0, len(said), 8)])
    print(f"wrote {out}: {len(x)} images, each with its caption under it")
    return out


def held_out_examples(args, ckpt, tokenizer, per_class, max_classes=16):
    """per_class held-out images of each class (at most max_classes) of the tokenizer's data and seed
    (--dataset and --data-path override them) -> (images (N, 3, H, W), names)."""
    trained = ckpt.get("args", {})
    name = args.dataset or trained.get("dataset", "shapes")
    same = name == trained.get("dataset", "shapes")
    path = resolve_data_path(name, args.data_path or (trained.get("data_path") if same else None))
    held_out = make_dataset(name, path, "val", tokenizer.cfg.image_size, seed=trained.get("seed", 0) if same else 0,
                            cache_dir=args.out_dir)
    kept, classes = {}, min(held_out.num_classes, max_classes)
    for x, y in eval_loader(held_out, 128):
        keep_class_examples(kept, y, x, per_class=per_class, max_classes=classes)
        if len(kept) == classes and all(len(v) == per_class for v in kept.values()):
            break
    return class_rows(kept)[0], [f"held-out {held_out.classes[c]}" for c in sorted(kept) for _ in kept[c]]


def reconstruct(args, ckpt, tokenizer, out):
    if args.inputs:
        x, names = load_images(args.inputs, tokenizer.cfg.image_size), args.inputs
    else:  # two held-out images of each class (at most 16), as train.py shows
        x, names = held_out_examples(args, ckpt, tokenizer, per_class=2)
    x_rec = tokenizer.decode(tokenizer.encode(x.to(args.device)))
    for name, db in zip(names, psnr(x_rec, x.to(args.device)).tolist()):
        print(f"{db:6.2f} dB  {name}")
    save_grid([x, x_rec], out)
    print(f"wrote {out}: originals above, reconstructions below")
    return out


def coarse_to_fine(tokenizer, ids_BL):
    """ids (B, L) -> images (B, S, 3, H, W): image k decoded from the ids of scales 1..k alone (the running
    f_hat through the pixel decoder, as the quantizer builds it and the GPT reads it); the last is
    tokenizer.decode(ids)."""
    return torch.stack([tokenizer.pixel_decode(f).clamp(-1, 1) for f in tokenizer.cumulative_features(ids_BL)], 1)


def scales(args, ckpt, tokenizer, out):
    """One row per image, one column per scale: held-out images (encoded, the original last), then with
    OUT_DIR/gpt.pt one generated sample per class of --classes (default: the first 16)."""
    x, names = held_out_examples(args, ckpt, tokenizer, per_class=1, max_classes=4)
    x = x.to(args.device)
    rows = torch.cat([coarse_to_fine(tokenizer, tokenizer.encode(x)), x[:, None]], 1)  # (b, S + 1, 3, H, W)
    gpt_path = os.path.join(args.out_dir, "gpt.pt")
    if os.path.exists(gpt_path):
        gpt, gpt_ckpt = load_model(gpt_path, "gpt", tokenizer)
        classes = class_ids(args.classes or [], gpt_ckpt.get("classes"), gpt.cfg.num_classes, gpt_path)
        labels = torch.tensor(classes or range(min(gpt.cfg.num_classes, 16)), device=args.device)
        ids = gpt.to(args.device).eval().generate(labels, generator=torch.Generator(args.device).manual_seed(args.seed),
                                                  **sampling_options(args))
        generated = coarse_to_fine(tokenizer, ids)
        rows = torch.cat([rows, torch.cat([generated, torch.ones_like(generated[:, :1])], 1)])  # no original: white
        known = gpt_ckpt.get("classes") or []
        names += [f"generated {known[c] if c < len(known) else c}" for c in labels.tolist()]
    header = [f"{s}x{s}" for s in tokenizer.cfg.scales] + ["original"]
    save_grid(list(rows), out, header=header)
    print(f"wrote {out}: one row per image ({', '.join(names)}); columns: scales {', '.join(header)}")
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
    if not isinstance(ids, np.ndarray):  # an .npz archive
        raise ValueError(f"{args.inputs[0]} holds several arrays; give a .npy file of ids (N, L)")
    if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 2 or not len(ids):
        raise ValueError(f"{args.inputs[0]} holds {ids.dtype} values of shape {ids.shape}; give token ids: "
                         "integers (N, L), N >= 1 (python sample.py encode writes them)")
    x = tokenizer.decode(torch.from_numpy(ids.astype(np.int64)).to(args.device))
    save_grid([x], out)
    print(f"wrote {out}: {len(x)} images")
    return out


MODES = {"generate": (generate, "samples.png"), "caption": (caption, "captions.png"),
         "reconstruct": (reconstruct, "reconstructions_sample.png"),
         "encode": (encode, "ids.npy"), "decode": (decode, "decoded.png"), "scales": (scales, "scales.png")}


@torch.no_grad()
def main(argv=None):
    args = get_args(argv)
    tokenizer, ckpt = load_model(args.tokenizer or os.path.join(args.out_dir, "tokenizer.pt"), "tokenizer")
    run, default_out = MODES[args.mode] if args.prompt is None else (text_to_image, "samples.png")
    return run(args, ckpt, tokenizer.to(args.device).eval(), args.out or os.path.join(args.out_dir, default_out))


def cli(argv=None):
    """The command line: bad input ends in one line and exit code 2."""
    return run_script(main, argv)


if __name__ == "__main__":
    cli()
