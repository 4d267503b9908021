"""
Train TokenFlow, stage by stage: the toy teacher, the tokenizer, the judge (a classifier that
scores generated images), then the next-scale GPT; on the shapes, also the unified transformer
that captions the ids and draws them from captions.

    python train.py                      # the CPU toy run: shapes -> teacher -> tokenizer -> judge -> GPT, into out/
    python train.py --stage gpt          # one stage, reading earlier stages' checkpoints from out/
    python train.py --iters 2            # a smoke run: 2 optimisation steps per stage
    python train.py --stage unified      # after the toy run: captions <-> ids, into out/unified.pt

Read top to bottom: the one training loop, then the stages with their losses that run it; then
the PatchGAN's parts, per-stage defaults, small helpers, the command line and main. A stage's checkpoint holds all it
needs (config, weights, optimiser, args): sample.py, evaluate.py and later stages rebuild models
from it alone. Under torchrun every process runs this file; rank 0 logs and writes. The plumbing
(checkpoint files and resume, signals, DDP, flag checks, weight files) is utils/'s.
"""

import json
import math
import os
import shlex
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import tokenflow as tf
from data import (DATASETS, EVAL_IMAGES, TokenDataset, describe, device_batches, eval_loader, make_dataset,
                  resolve_data_path)
from data.shapes import CAPTION_LEN, HELD_OUT_PAIRS, VOCAB, ShapesDataset, held_out_pair
from metrics import (autocast_ctx, caption_scores, evaluate_gpt, evaluate_judge, evaluate_teacher, evaluate_tokenizer,
                     evaluate_unified, generated_row, reconstructions, t2i_scores)
from utils.checkpoints import (check_resumable_on, config_diff, load_checkpoint, load_model, matching_weights,
                               save_checkpoint, tokenizer_id)
from utils.cli import (SEED, OneLineErrors, check_folder, check_numbers, compile_toolchain_missing, device_and_dtype,
                       run_script)
from utils.distributed import (all_mean, all_sum, destroy_distributed, init_distributed, main_first, rank_and_world_size,
                               rank_share, wrap)
from utils.grids import save_grid
from utils.token_files import cached_tokens
from utils.train_state import EMA, BadSteps, Interrupt, NonFiniteLoss, TrainState
from utils.weights import load_lpips, load_teacher, teacher_path

# ---------------------------------------------------------------------------------------------
# The training loop every stage shares


def train_loop(args, stage, model, net, params, data, loss_fn, eval_fn, save_fn, weight_decay=0.0, gan=None):
    """lr -> every --eval-interval steps: evaluate + checkpoint -> forward/backward over the
    micro-batches -> clip -> step (and one discriminator step with gan) -> EMA -> one log line. model
    is the raw module (saved, evaluated), net what loss_fn calls (compiled / DDP); loss_fn(x, y, step)
    -> (loss, dict of floats); eval_fn() -> dict; save_fn(step, state) saves the model with the loop's
    state into OUT_DIR/<stage>.pt."""
    hp = stage_hparams(args, stage)
    opt = torch.optim.AdamW(params, lr=hp["lr"], betas=(0.9, 0.95), weight_decay=weight_decay,
                            fused=args.device.startswith("cuda"))  # betas as TokenFlow
    scaler = torch.amp.GradScaler(args.device.split(":")[0], enabled=args.dtype == "float16")  # fp16 only
    run = TrainState(model, opt, scaler, EMA(model, hp["ema"]) if hp["ema"] > 0 else None, args.device,
                     os.path.join(args.out_dir, f"{stage}.pt"), save_fn, args.rank == 0, lambda text: log(args, text))
    first = step = run.resume(stage) if args.resume else 0
    faults = BadSteps(stage, lambda text: log(args, text))
    batches = device_batches(data, hp["batch_size"] // (args.world_size * args.grad_accum), args.seed, rank=args.rank,
                             world_size=args.world_size, device=args.device, num_workers=args.num_workers,
                             overfit=args.overfit_batch, start=step * args.grad_accum, log=lambda text: log(args, text))
    bar = tqdm(range(step, hp["iters"]), desc=stage, dynamic_ncols=True, disable=hp["iters"] == step or args.rank != 0)
    t0 = time.time()
    with Interrupt() as interrupt:
        for step in bar:
            lr = get_lr(step, hp["iters"], hp["lr"])
            for group in opt.param_groups:
                group["lr"] = lr
            if step > first and step % args.eval_interval == 0:  # (a resumed run has this row and file)
                log_metrics(args, {"stage": stage, "step": step, "split": "val", **run.evaluate(eval_fn)})
                run.save(step, faults)
            model.train()
            loss, stats, finite = accumulate(args, net, batches, loss_fn, step, scaler)
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)  # as TokenFlow: clip at 1.0
            finite = finite and (scaler.is_enabled() or bool(torch.isfinite(grad_norm)))  # fp16: the scaler's job
            shown, bad, stop = agree(args, {"loss": loss.item(), **stats}, finite, interrupt)
            if bad:  # skip the update: every rank agrees, so the weights stay the same everywhere
                faults.skip(step, run.where())
            else:
                scaler.step(opt)
                faults.ok()
            if gan is not None:
                gan.step(scaler, skip=bad)  # one discriminator step per generator step
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if run.ema and not bad:
                run.ema.update(model, step)
            bar.set_postfix(gnorm=f"{grad_norm.item():.2f}", lr=f"{lr:.2e}", **{k: f"{v:.4g}" for k, v in shown.items()})
            if stop:  # a signal on some rank: the row and the checkpoint a resume needs, then exit
                if (step + 1) % args.eval_interval == 0 and step + 1 < hp["iters"]:
                    log_metrics(args, {"stage": stage, "step": step + 1, "split": "val", **run.evaluate(eval_fn)})
                interrupt.exit_after_signal(stage, step + 1, run.save(step + 1, faults), lambda text: log(args, text))
    row = {"stage": stage, "step": hp["iters"], "split": "val", **run.evaluate(eval_fn),
           "train_s": round(time.time() - t0, 1), **({"skipped_steps": faults.total} if faults.total else {})}
    log_metrics(args, row)
    run.save(hp["iters"])
    if run.ema:
        model.load_state_dict(run.ema.weights)  # what later stages and sampling use, as load_model does
    return row


def accumulate(args, net, batches, loss_fn, step, scaler):
    """Forward + backward of --grad-accum micro-batches -> (last loss, its stats, all losses finite?)."""
    finite = True
    for i in range(args.grad_accum):
        x, y = next(batches)
        # DDP all-reduces gradients in backward; only the last micro-batch of a step needs to
        sync = net.no_sync() if args.world_size > 1 and i < args.grad_accum - 1 else nullcontext()
        with sync:
            with autocast_ctx(args.device, args.dtype):
                loss, stats = loss_fn(x, y, step)
            finite = finite and bool(torch.isfinite(loss))
            scaler.scale(loss / args.grad_accum).backward()
    return loss, stats, finite


def agree(args, shown, finite, interrupt):
    """One all-reduce per step -> (the numbers shown, averaged over ranks; did any rank see a
    non-finite loss or gradient?; did any rank get a signal?)."""
    flags = {"bad": not finite, "stop": interrupt.signal is not None}
    summed = dict(zip([*shown, *flags], all_sum(torch.tensor([*shown.values(), *flags.values()],
                                                             dtype=torch.float64)).tolist()))
    return {k: summed[k] / args.world_size for k in shown}, summed["bad"] > 0, summed["stop"] > 0


def get_lr(step, iters, peak):
    """Linear warmup, then cosine decay to peak / 10."""
    warmup = max(1, int(WARMUP * iters))
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, iters - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# ---------------------------------------------------------------------------------------------
# Stage 1: the toy teacher, a small ViT classifier standing in for CLIP


def train_teacher(args, cfg):
    torch.manual_seed(args.seed)
    data = dataset(args, cfg.image_size, "train")
    teacher = tf.Teacher(cfg, data.num_classes).to(args.device)
    net = wrap(teacher, args.device, args.world_size, args.compile)

    def save_fn(step, state):
        save_checkpoint(os.path.join(args.out_dir, "teacher.pt"), "teacher", cfg, teacher, step,
                        num_classes=teacher.num_classes, classes=data.classes, args=vars(args), **state)

    return train_loop(args, "teacher", teacher, net, list(teacher.parameters()), data,
                      lambda x, y, _: (F.cross_entropy(net(x), y), {}),
                      lambda: evaluate_teacher(teacher, held_out(args, cfg), args.device, args.dtype, all_sum),
                      save_fn, weight_decay=0.05)


# ---------------------------------------------------------------------------------------------
# Stage 2: the tokenizer. Its loss (TokenFlow Sec. 3.3): L2 + LPIPS + PatchGAN on the pixel side,
# cosine to the teacher's features on the semantic side, plus the VQ loss.


def tokenizer_loss(x, x_rec, sem, target, vq, lpips=None, gan=None, last_layer=None):
    """TokenFlow's objective on one batch -> (loss, dict of floats): L2 + LPIPS (weight 1, with
    lpips) + the generator's hinge term (weight gan.weight, with gan) + the semantic loss
    mean(1 - cos(sem, target)) (absent when sem is None, --codebook pixel) + vq. With gan the
    discriminator's hinge loss joins the sum: it reaches only the discriminator's weights (it reads
    x_rec detached) and the generator's term only the tokenizer's (the discriminator is frozen for
    it), so one backward serves both. x, x_rec (B, 3, H, W); sem, target (B, n*n, T)."""
    rec = F.mse_loss(x_rec, x) + (lpips(x_rec, x).mean() if lpips else 0)
    loss, stats = rec + vq, {"rec": rec.item()}
    if gan is not None:
        gan.disc.requires_grad_(False)  # the generator's term trains the decoder, not the discriminator
        g_loss = -gan.disc(x_rec).mean()
        gan.disc.requires_grad_(True)
        w = tf.adaptive_weight(rec, g_loss, last_layer) if gan.adaptive else 1
        if gan.adaptive:  # each rank's is from its own batch: use their mean
            w = all_mean(w)
        d_loss = gan.d_loss(x, x_rec.detach())
        loss, stats = loss + gan.weight * w * g_loss + d_loss, {**stats, "g": g_loss.item(), "d": d_loss.item()}
    if sem is not None:
        sem_loss = (1 - F.cosine_similarity(sem, target, dim=-1)).mean()
        loss, stats = loss + sem_loss, {**stats, "sem": sem_loss.item()}
    return loss, stats


def train_tokenizer(args, cfg):
    teacher = teacher_for(args, cfg)
    torch.manual_seed(args.seed)
    tokenizer = tf.TokenFlow(cfg).to(args.device)
    if tokenizer.sem_enc is not None:
        tokenizer.sem_enc.load_state_dict(teacher.vit.state_dict())  # the semantic encoder starts as the teacher
    net = wrap(tokenizer, args.device, args.world_size, args.compile)

    def forward(x):  # -> reconstruction, decoded semantic features, VQ loss, stats
        x_rec, sem, stats = net(x)
        return x_rec, sem, stats["vq"], {"usage": stats["usage"].item()}

    return train_pixels(args, "tokenizer", tokenizer, net, forward, list(tokenizer.parameters()), teacher)


def finetune_decoder(args, cfg):
    """The enhanced-decoder stage: the encoders, codebooks and semantic decoder of OUT_DIR/tokenizer.pt
    frozen, a pixel decoder of cfg's size (the trained one when the sizes agree, else a new one)
    trained on the pixel losses of the inference-time features (all scales) -> OUT_DIR/decoder.pt,
    a whole tokenizer with the same ids, so token files and GPT stay valid."""
    trained, _ = load_model(os.path.join(args.out_dir, "tokenizer.pt"), "tokenizer")
    diff = config_diff(trained.cfg, cfg, [k for k in asdict(cfg) if not k.startswith("pix_dec")])
    if diff:
        raise ValueError(f"{args.out_dir}/tokenizer.pt vs preset {args.preset!r} differ in {'; '.join(diff)}; "
                         "pass the --codebook it was trained with, or finetune a tokenizer of this preset")
    teacher = teacher_for(args, cfg)
    torch.manual_seed(args.seed)
    tokenizer, same = tf.TokenFlow(cfg), trained.cfg == cfg
    missing, _ = tokenizer.load_state_dict({k: v for k, v in trained.state_dict().items()
                                            if same or not k.startswith("pix_dec.")}, strict=same)
    assert all(k.startswith("pix_dec.") for k in missing), missing  # only the new decoder starts fresh
    tokenizer = tokenizer.to(args.device).requires_grad_(False)
    tokenizer.pix_dec.requires_grad_(True)
    path, net = os.path.join(args.out_dir, "decoder.pt"), wrap(tokenizer.pix_dec, args.device, args.world_size, args.compile)
    if args.resume:
        check_resumable_on(path, "tokenizer", trained, f"{args.out_dir}/tokenizer.pt")
    log(args, f"decoder: {'finetuning the trained' if same else 'training a new'} pixel decoder "
              f"({sum(p.numel() for p in tokenizer.pix_dec.parameters()):,} parameters), the rest frozen")

    def forward(x):  # the pixel terms only: no semantic output, no VQ loss
        with torch.no_grad():
            f_hat, _, _ = tokenizer.quantize(tokenizer.features(x), cfg.scales)
        return net(tokenizer.pixel_half(f_hat)), None, 0, {}

    return train_pixels(args, "decoder", tokenizer, net, forward, list(tokenizer.pix_dec.parameters()), teacher)


def train_pixels(args, stage, tokenizer, net, forward, params, teacher):
    """What the tokenizer stage and the decoder finetune share: tokenizer_loss on forward(x) ->
    (x_rec, sem or None, vq, stats), the PatchGAN from --disc-start, OUT_DIR/<stage>.pt (a tokenizer
    checkpoint either way), and the held-out tokenizer metrics."""
    path, hp = os.path.join(args.out_dir, f"{stage}.pt"), stage_hparams(args, stage)
    lpips, gan = pixel_losses(args, hp["iters"], hp["lr"], path)
    data = dataset(args, tokenizer.cfg.image_size, "train")

    def loss_fn(x, y, step):
        x_rec, sem, vq, stats = forward(x)
        with torch.no_grad():
            target = teacher.features(x) if sem is not None else None  # (B, n*n, T)
        active = gan if gan is not None and step >= args.disc_start else None
        loss, log = tokenizer_loss(x, x_rec, sem, target, vq, lpips, active, tokenizer.pix_dec.conv_out.weight)
        return loss, {**log, **stats}

    def save_fn(step, state):
        save_checkpoint(path, "tokenizer", tokenizer.cfg, tokenizer, step, classes=data.classes, args=vars(args),
                        **state, **(gan.state() if gan else {}))

    def eval_fn():  # rank 0 also draws held-out images over their reconstructions
        grid = os.path.join(args.out_dir, "reconstructions.png") if args.rank == 0 else None
        return evaluate_tokenizer(tokenizer, teacher, held_out(args, tokenizer.cfg, 128), args.device, args.dtype,
                                  reduce=all_sum, grid_png=grid)

    return train_loop(args, stage, tokenizer, net, params, data, loss_fn, eval_fn, save_fn, gan=gan)


# ---------------------------------------------------------------------------------------------
# Stage 3 (toy preset): the judge, a small CNN that scores generated images (tf.Judge). It and the
# GPT read the training images tokenized once into OUT_DIR/tokens/


def train_judge(args, cfg):
    """Training images and the tokenizer's reconstructions of them, each labelled with the image's
    class (JUDGE: how many, per dataset) -> OUT_DIR/judge.pt. On shapes, half as many blobs
    (ShapesDataset.blobs), also reconstructed, labelled "none of the classes". Trained on what the
    decoder draws, the judge can score the GPT's images; held-out, it reports recon_class_acc (the
    ceiling a generator can reach through this decoder) and acc (on the real images). The images
    are the first of the GPT's training set, whose ids this stage tokenizes once for both."""
    tokenizer, sizes = trained_tokenizer(args, cfg), JUDGE[args.dataset if args.dataset in JUDGE else "other"]
    tokens = token_file(args, tokenizer, "train")
    n = min(sizes["images"], len(tokens))
    data = dataset(args, cfg.image_size, "train", args.token_images, augment=False)
    x, y = map(torch.cat, zip(*eval_loader(torch.utils.data.Subset(data, range(n)), 256)))
    x_rec = torch.cat([decoded(args, tokenizer, ids) for ids in torch.from_numpy(tokens.ids[:n].astype("int64")).split(256)])
    none_class = isinstance(data, ShapesDataset)
    if none_class:
        blobs = list(zip(data.blobs(range(n // 2)), torch.full((n // 2,), data.num_classes)))
        b, b_rec, b_y = reconstructions(tokenizer, eval_loader(blobs, 256), args.device, args.dtype)
        x, x_rec, y = torch.cat([x, b]), torch.cat([x_rec, b_rec]), torch.cat([y, b_y])
    torch.manual_seed(args.seed)
    judge = tf.Judge(data.num_classes, none_class, sizes["width"]).to(args.device)
    net = wrap(judge, args.device, args.world_size, args.compile)

    def save_fn(step, state):
        save_checkpoint(os.path.join(args.out_dir, "judge.pt"), "judge", cfg, judge, step, classes=data.classes,
                        num_classes=judge.num_classes, none_class=none_class, width=sizes["width"], args=vars(args),
                        **state)

    pairs = torch.utils.data.TensorDataset(torch.cat([x, x_rec]), torch.cat([y, y]))
    return train_loop(args, "judge", judge, net, list(judge.parameters()), pairs,
                      lambda x, y, _: (F.cross_entropy(net(x), y), {}),
                      lambda: evaluate_judge(judge, tokenizer, held_out(args, cfg), args.device, args.dtype, all_sum),
                      save_fn, weight_decay=0.05)


# ---------------------------------------------------------------------------------------------
# Stage 4: the next-scale GPT, on the tokenizer's ids


def train_gpt(args, tok_cfg, gpt_cfg):
    tokenizer = trained_tokenizer(args, tok_cfg)
    train_set, val_set = (token_file(args, tokenizer, split) for split in ("train", "val"))
    gpt_path, tid = os.path.join(args.out_dir, "gpt.pt"), tokenizer_id(tokenizer)
    if args.resume:
        check_resumable_on(gpt_path, "gpt", tokenizer, f"{args.out_dir}/tokenizer.pt")
    classes = class_names(args, tok_cfg.image_size)  # the training split's, not the held-out one's
    gpt_cfg = replace(gpt_cfg, num_classes=len(classes))
    judge = trained_judge(args, classes)  # checked before training
    torch.manual_seed(args.seed)
    gpt = tf.GPT(gpt_cfg, tokenizer).to(args.device)
    net = wrap(gpt, args.device, args.world_size, args.compile)

    def save_fn(step, state):
        save_checkpoint(gpt_path, "gpt", gpt_cfg, gpt, step, tokenizer_config=asdict(tokenizer.cfg),
                        tokenizer_id=tid, classes=classes, args=vars(args), **state)

    def eval_fn():  # rank 0 also draws 8 samples per class (at most 16 classes), the same at every evaluation
        row = evaluate_gpt(gpt, eval_loader(rank_share(val_set, args.rank, args.world_size), 256), args.device,
                           args.dtype, all_sum)
        if args.rank == 0:
            labels = torch.arange(min(gpt.cfg.num_classes, 16), device=args.device).repeat_interleave(8)
            with autocast_ctx(args.device, args.dtype):
                x = tokenizer.decode(gpt.generate(labels, generator=torch.Generator(args.device).manual_seed(args.seed)))
            save_grid(list(x.float().split(8)), os.path.join(args.out_dir, "gpt_samples.png"))
        return row

    row = train_loop(args, "gpt", gpt, net, list(gpt.parameters()), train_set,
                     lambda idx, y, _: (tf.gpt_loss(net(idx, y), idx), {}), eval_fn, save_fn, weight_decay=0.05)
    teacher = teacher_for(args, tok_cfg)  # (every rank: it waits for rank 0)
    if judge is None and teacher.head is None:  # CLIP: nothing here classifies images
        return row
    recon = evaluate_judge(judge, tokenizer, held_out(args, tok_cfg), args.device, args.dtype, all_sum) if judge else {}
    if args.rank == 0:  # the last row: how the samples read, at the default guidance and at 0
        labels = torch.arange(len(classes), device=args.device).repeat_interleave(JUDGED_SAMPLES)
        row = {"stage": "gpt", "step": row["step"], "split": "generated",
               **generated_row(gpt, tokenizer, teacher, judge, labels, 256, args.seed, args.device, args.dtype,
                               shapes=args.dataset == "shapes", recon_class_acc=recon.get("recon_class_acc"))}
        log_metrics(args, row)
    return row


# ---------------------------------------------------------------------------------------------
# Stage 5 (shapes, python train.py --stage unified): one transformer that captions the ids and draws
# them from captions (tf.UnifiedGPT), trained without any image of the held-out (colour, shape) pairs


def train_unified(args, tok_cfg, gpt_cfg):
    tokenizer = trained_tokenizer(args, tok_cfg)
    train_set, val_set = (captioned_tokens(args, tokenizer, split) for split in ("train", "val"))
    path, tid = os.path.join(args.out_dir, "unified.pt"), tokenizer_id(tokenizer)
    if args.resume:
        check_resumable_on(path, "unified", tokenizer, f"{args.out_dir}/tokenizer.pt")
    judge = trained_judge(args, class_names(args, tok_cfg.image_size))
    torch.manual_seed(args.seed)
    model = tf.UnifiedGPT(replace(gpt_cfg, vocab_size=len(VOCAB), caption_len=CAPTION_LEN), tokenizer).to(args.device)
    net = wrap(model, args.device, args.world_size, args.compile)

    def loss_fn(idx, words, _):  # every image both drawn from its caption and captioned, in one batch
        image_logits, word_logits = net(idx, words)
        gen, cap = tf.gpt_loss(image_logits, idx), tf.caption_loss(word_logits, words)
        return gen + CAPTION_WEIGHT * cap, {"gen": gen.item(), "cap": cap.item()}

    def save_fn(step, state):
        save_checkpoint(path, "unified", model.cfg, model, step, tokenizer_config=asdict(tokenizer.cfg),
                        tokenizer_id=tid, vocab=VOCAB, held_out_pairs=HELD_OUT_PAIRS, args=vars(args), **state)

    eval_fn = lambda: evaluate_unified(model, eval_loader(rank_share(val_set, args.rank, args.world_size), 256),
                                       args.device, args.dtype, all_sum)
    row = train_loop(args, "unified", model, net, list(model.parameters()), train_set, loss_fn, eval_fn, save_fn,
                     weight_decay=0.05)
    if args.rank == 0:  # the last row: captions of the held-out split, text-to-image judged
        ids, words = (torch.from_numpy(a.astype("int64")) for a in (val_set.ids, val_set.labels))
        row = {"stage": "unified", "step": row["step"], "split": "val", **caption_scores(model, ids, words, args.device),
               **(t2i_scores(model, tokenizer, judge, args.seed, args.device, args.dtype) if judge else {})}
        log_metrics(args, row)
    return row


def captioned_tokens(args, tokenizer, split):
    """A split's token file with each image's caption as its label (ids (N, L), words (N, W)); the
    training split without the images of HELD_OUT_PAIRS."""
    tokens = token_file(args, tokenizer, split)
    words = dataset(args, tokenizer.cfg.image_size, split, len(tokens)).captions(range(len(tokens)))
    keep = ~held_out_pair(words) if split == "train" else torch.ones(len(words), dtype=torch.bool)
    return TokenDataset(tokens.ids[keep.numpy()], words[keep].numpy())


# ---------------------------------------------------------------------------------------------
# The PatchGAN's parts: the discriminator, its loss as DDP runs it, its optimiser and its step


@dataclass
class GAN:
    """The PatchGAN of the pixel loss (VQGAN): discriminator, its loss as DDP runs it, its optimiser."""
    disc: nn.Module
    d_loss: nn.Module
    opt: torch.optim.Optimizer
    weight: float = 0.5
    adaptive: bool = False  # scale by VQGAN's ratio of gradient norms (tf.adaptive_weight)

    def state(self):  # what a checkpoint keeps
        return {"disc": self.disc.state_dict(), "disc_optimizer": self.opt.state_dict()}

    def step(self, scaler, skip=False):
        """The discriminator's step, on gradients scaled as the generator's were (the scaler skips a
        non-finite fp16 step), then its gradients cleared; none with skip (the generator's step was
        skipped), before --disc-start (no gradients) or when they are not finite (all-reduced: every
        rank agrees)."""
        grads = [p.grad for p in self.disc.parameters() if p.grad is not None]
        if grads and not skip:
            scaler.unscale_(self.opt)
            if scaler.is_enabled() or all(g.isfinite().all() for g in grads):
                scaler.step(self.opt)
        self.opt.zero_grad(set_to_none=True)


class DiscriminatorLoss(nn.Module):  # the hinge loss on a real and a fake batch, one forward for DDP
    def __init__(self, disc):
        super().__init__()
        self.disc = disc

    def forward(self, real, fake):
        return tf.hinge_d_loss(self.disc(real), self.disc(fake))


def pixel_losses(args, iters, lr, path):
    """LPIPS (with --lpips-weights) and, for a run that reaches --disc-start, the GAN (resumed from
    path with the stage) -> (lpips or None, gan or None)."""
    with main_first(args.rank):  # one download, not one per rank
        lpips = load_lpips(args.lpips_weights).to(args.device) if args.lpips_weights else None
    log(args, f"{os.path.basename(path)[:-3]}: LPIPS {'on' if lpips else 'off (no --lpips-weights)'}, "
              f"PatchGAN from step {args.disc_start}")
    if args.disc_start >= iters:  # only a run that reaches the GAN builds (and saves) the discriminator
        return lpips, None
    with torch.random.fork_rng(devices=[]):  # its init leaves the training RNG (scale drop) as it was
        disc = tf.PatchDiscriminator().to(args.device)
    gan = GAN(disc, wrap(DiscriminatorLoss(disc), args.device, args.world_size),
              torch.optim.AdamW(disc.parameters(), lr=lr, betas=(0.5, 0.9)),  # VQGAN's discriminator betas
              args.disc_weight, args.adaptive_disc_weight)
    if args.resume and os.path.exists(path) and "disc" in (ckpt := load_checkpoint(path, "tokenizer")):
        disc.load_state_dict(matching_weights(disc, ckpt["disc"], f"{path} (discriminator)"))
        gan.opt.load_state_dict(ckpt["disc_optimizer"])
    return lpips, gan


# ---------------------------------------------------------------------------------------------
# Per-stage defaults, used where the command line leaves a value unset

DEFAULTS = {  # (preset, stage) -> iterations, global batch size, peak learning rate, EMA decay (0: none)
    ("toy", "teacher"): dict(iters=1000, batch_size=64, lr=1e-3, ema=0),
    ("toy", "tokenizer"): dict(iters=540, batch_size=16, lr=1e-3, ema=0),
    ("toy", "decoder"): dict(iters=300, batch_size=16, lr=1e-3, ema=0),
    ("toy", "judge"): dict(iters=300, batch_size=128, lr=2e-3, ema=0),
    ("toy", "gpt"): dict(iters=1600, batch_size=16, lr=3e-3, ema=0),
    ("toy", "unified"): dict(iters=1200, batch_size=16, lr=3e-3, ema=0),
    # TokenFlow-B: Adam 1e-4 as the paper; its teacher is CLIP ViT-B/16, given with --teacher
    ("tokenflow-b", "tokenizer"): dict(iters=100_000, batch_size=256, lr=1e-4, ema=0.9999),
    # the enhanced-decoder finetune: the paper gives no schedule; half the tokenizer's is our choice
    ("tokenflow-b", "decoder"): dict(iters=50_000, batch_size=256, lr=1e-4, ema=0.9999),
    # VAR-d16's recipe: 200 epochs of ImageNet at batch 768, lr 1e-4 * 768 / 256
    ("tokenflow-b", "gpt"): dict(iters=330_000, batch_size=768, lr=3e-4, ema=0.9999),
}
DATASET_DEFAULTS = {  # (dataset, stage) -> changes to the toy preset's DEFAULTS for that dataset
    # the shapes teacher: 1,000 x 32 reaches 98.7% (seed 0, 66-79 s today; 99.9-100% on two seeds
    # earlier); 500 x 64, the same images, stops at 78-88% (data/shapes/README.md)
    ("shapes", "teacher"): dict(batch_size=32),
    # real photos need a longer-trained toy teacher than the shapes: 1,000 steps reach 79.3% on the
    # Fashion-MNIST test set, 3,000 steps at lr 2e-3 88.4-88.7%, 4,000 89.4% (data/fashion_mnist/README.md)
    ("fashion-mnist", "teacher"): dict(iters=3000, lr=2e-3),
    ("fashion-mnist", "judge"): dict(iters=600),  # with JUDGE["other"]: 86.1% on the test reconstructions
    ("fashion-mnist", "gpt"): dict(iters=1000),  # the judge's 2.5 min come from here and from the teacher
}
# images the GPT stage tokenizes (default: all of a dataset): the shapes are endless; 60,000
# Fashion-MNIST images take 2.4 min on 2 cores, and the GPT sees at most 25,600
TOKEN_IMAGES = {"shapes": 8192, "fashion-mnist": 16384}
JUDGE = {  # dataset -> training images the judge reads (each also as its reconstruction) and its width
    "shapes": dict(images=2048, width=16),
    # photos need more: on Fashion-MNIST, 2,048 images at width 16 read 81.5% of the test reconstructions
    # right, 8,192 at width 16 (600 steps) 84.4%, 16,384 at width 32 86.1% (data/fashion_mnist/README.md)
    "other": dict(images=16384, width=32),
}
# the unified stage's loss: ids + this x words. At weight 1 the caption's gradients, 3-5x the image loss's
# early on, fill the norm that clipping holds at 1.0 and slow text-to-image (data/shapes/README.md)
CAPTION_WEIGHT = 0.1
JUDGED_SAMPLES = 64  # generated images per class that the GPT stage's last row scores
CODEBOOKS = {"dual": {}, "pixel": dict(sem_dim=0), "semantic": dict(pix_dim=0)}  # --codebook: a half of width 0 is absent
WARMUP = 0.05  # fraction of a stage's steps spent warming up the learning rate


def stages(args):
    """The stages this run trains, in order."""
    if args.finetune_decoder:
        return ["decoder"]
    if args.stage == "unified":
        return ["unified"]
    return [s for s in ("teacher", "tokenizer", "judge", "gpt") if args.stage in ("all", s)
            and not (s == "teacher" and args.teacher != "toy") and (args.preset, s) in DEFAULTS]


def stage_hparams(args, stage):
    """iters, batch_size, lr, ema of a stage: the command line's where given, else DEFAULTS (with the
    toy preset, changed by DATASET_DEFAULTS)."""
    defaults = {**DEFAULTS[(args.preset, stage)],
                **(DATASET_DEFAULTS.get((args.dataset, stage), {}) if args.preset == "toy" else {})}
    return {k: v if getattr(args, k) is None else getattr(args, k) for k, v in defaults.items()}


# ---------------------------------------------------------------------------------------------
# Small helpers: the run's data, the models earlier stages trained, logging


def dataset(args, image_size, split, size=None, augment=None):
    """The train or val split of --dataset (val: --eval-images images)."""
    size = size or (args.eval_images if split == "val" else None)
    return make_dataset(args.dataset, args.data_path, split, image_size, size, args.seed, augment, args.out_dir)


def held_out(args, cfg, batch_size=256):
    """This rank's share of the held-out split, in order."""
    return eval_loader(rank_share(dataset(args, cfg.image_size, "val"), args.rank, args.world_size), batch_size)


def class_names(args, image_size):
    """The run's classes: the training split's, which the held-out split, the teacher and the GPT
    follow; every checkpoint keeps them (sample.py --classes takes names)."""
    return dataset(args, image_size, "train").classes


def teacher_for(args, cfg):
    """The frozen teacher of --teacher on the device (rank 0 downloads CLIP first); a toy teacher
    must know the run's classes."""
    with main_first(args.rank):
        path = teacher_path(args.teacher, args.out_dir)
    classes = class_names(args, cfg.image_size)
    return load_teacher(path, cfg, maybe_clip=args.teacher != "toy", classes=classes).to(args.device)


def trained_tokenizer(args, cfg):
    """OUT_DIR/tokenizer.pt, frozen on the device, checked against the preset's config cfg."""
    path = os.path.join(args.out_dir, "tokenizer.pt")
    tokenizer, _ = load_model(path, "tokenizer")
    diff = config_diff(tokenizer.cfg, cfg)
    if diff:
        raise ValueError(f"tokenizer {path} vs preset {args.preset!r} differ in {'; '.join(diff)}; "
                         "pass the --codebook and --enhanced-decoder it was trained with, or train a tokenizer "
                         f"for this preset first (python train.py --preset {args.preset} --stage tokenizer --out-dir "
                         f"{shlex.quote(args.out_dir)})")
    return tokenizer.to(args.device).eval().requires_grad_(False)


def trained_judge(args, classes):
    """OUT_DIR/judge.pt on the device, checked against the run's classes; None if there is none."""
    path = os.path.join(args.out_dir, "judge.pt")
    if os.path.exists(path):
        fix = f"train the judge on this data (python train.py --stage judge --out-dir {shlex.quote(args.out_dir)})"
        return load_model(path, "judge", classes=classes, fix=fix)[0].to(args.device).eval()
    if (args.preset, "judge") in DEFAULTS:
        log(args, f"no {path}: the GPT's samples will not be scored (python train.py --stage judge "
                  f"--out-dir {shlex.quote(args.out_dir)} trains the judge)")


def token_file(args, tokenizer, split):
    """A split tokenized once into OUT_DIR/tokens/ (utils/token_files.py), reused while the tokenizer's
    encoders and codebook and the data are the same; under torchrun every rank encodes a block."""
    data = dataset(args, tokenizer.cfg.image_size, split, args.token_images if split == "train" else None, augment=False)
    meta = {"tokenizer_id": tokenizer_id(tokenizer), "dataset": args.dataset, "data_path": args.data_path,
            "seed": args.seed, "images": len(data), "classes": data.classes, "seq_len": tokenizer.cfg.seq_len,
            "dtype": args.dtype}  # (classes: a label is an index into them)

    def encode(x):  # (b, 3, H, W) -> ids (b, L) on the CPU
        with torch.no_grad(), autocast_ctx(args.device, args.dtype):
            return tokenizer.encode(x.to(args.device)).cpu()

    tokenizer.eval()
    return cached_tokens(data, encode, os.path.join(args.out_dir, "tokens", split), meta, tokenizer.cfg.codebook_size,
                         args.rank, args.world_size, show=args.rank == 0)


@torch.no_grad()
def decoded(args, tokenizer, ids_BL):
    """Ids -> images (B, 3, H, W) in [-1, 1] on the CPU, through the pixel decoder."""
    with autocast_ctx(args.device, args.dtype):
        return tokenizer.decode(ids_BL.to(args.device)).float().clamp(-1, 1).cpu()


def log(args, text):
    if args.rank == 0:
        tqdm.write(text)


def log_metrics(args, row):
    """One row of OUT_DIR/metrics.jsonl and of the console, from rank 0."""
    if args.rank != 0:
        return
    with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


# ---------------------------------------------------------------------------------------------
# The command line and main

NUMBERS = {  # what each numeric flag must be, checked when the command line is parsed
    "iters": (lambda v: v >= 0, ">= 0"), "num_workers": (lambda v: v >= 0, ">= 0"),
    "disc_start": (lambda v: v >= 0, ">= 0"), "seed": SEED,
    **{name: (lambda v: v > 0, "> 0") for name in ("batch_size", "eval_interval", "eval_images", "token_images",
                                                    "grad_accum", "codebook_size")},
    "lr": (lambda v: v > 0, "> 0 (a finite number)"), "ema": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "disc_weight": (lambda v: v >= 0, ">= 0 (a finite number)"),
}


def get_args(argv=None):
    p = parser()
    return checked(p, p.parse_args(argv))


def parser():
    p = OneLineErrors(__doc__)
    # what to train
    p.add_argument("--preset", default="toy", help=f"model sizes, one of {sorted(tf.PRESETS)}")
    p.add_argument("--stage", default="all", choices=["all", "teacher", "tokenizer", "judge", "gpt", "unified"],
                   help="which stage to run; 'all' runs teacher, tokenizer, judge (toy preset), then GPT; 'unified' "
                        "(shapes, after 'all'): the transformer that captions images and draws captions")
    p.add_argument("--teacher", default="toy",
                   help="'toy': the teacher stage trains OUT_DIR/teacher.pt and the tokenizer stage reads it; "
                        "'clip-vit-b16': OpenAI CLIP ViT-B/16, downloaded once into $TOKENFLOW_CACHE "
                        "(~/.cache/tokenflow) and checked; a path: a teacher checkpoint or CLIP weights file")
    # data
    p.add_argument("--dataset", default="shapes", choices=DATASETS,
                   help="'shapes': synthetic, rendered on the fly; 'fashion-mnist': the IDX files data/fashion_mnist/"
                        "prepare.py puts in place; 'folder'/'imagenet': DATA_PATH/train/<class>/<image> and "
                        "DATA_PATH/val/...; 'cifar10': the folders data/cifar10/prepare.py writes")
    p.add_argument("--data-path", default=None, help="root of a folder dataset, or of the Fashion-MNIST files "
                   "(default: data/cifar10, data/fashion_mnist)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--token-images", type=int, default=None,
                   help="images the GPT stage tokenizes (default: TOKEN_IMAGES in train.py, else all)")
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
    p.add_argument("--enhanced-decoder", action="store_true", help="the enhanced pixel decoder: twice the preset's "
                   "channels and res blocks per level (tokenflow-b: 256 and 4, the official sizes)")
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
    return p


def checked(p, args):
    """Flags that cannot work together stop here with one line (p.error: exit code 2); the rank and
    world size (torchrun's), and the auto device and dtype, are filled in."""
    check_numbers(p, args, NUMBERS)
    check_folder(p, "--out-dir", args.out_dir)
    if args.lpips_weights is not None:
        check_folder(p, "--lpips-weights", args.lpips_weights)
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
    if args.stage == "unified" and (args.dataset != "shapes" or args.preset != "toy"):
        p.error(f"--stage unified needs captions, which only --dataset shapes has (--preset toy); "
                f"got --dataset {args.dataset} --preset {args.preset}")
    try:
        args.data_path = resolve_data_path(args.dataset, args.data_path)
    except ValueError as e:
        p.error(str(e))
    if args.stage == "judge" and (args.preset, "judge") not in DEFAULTS:
        p.error(f"preset {args.preset!r} has no judge stage: the judge is a toy-preset classifier; use --preset toy")
    if args.finetune_decoder and args.stage != "tokenizer":
        p.error("--finetune-decoder is a tokenizer-stage run: add --stage tokenizer")
    args.rank, args.world_size = rank_and_world_size()  # torchrun's
    for stage in stages(args):
        batch, ranks = stage_hparams(args, stage)["batch_size"], args.world_size * args.grad_accum
        if batch % ranks:
            p.error(f"--batch-size {batch} ({stage}) is global and must divide by world size {args.world_size} x "
                    f"--grad-accum {args.grad_accum} = {ranks}; pick a multiple of {ranks}")
    if args.token_images is None:
        args.token_images = TOKEN_IMAGES.get(args.dataset)
    args.device, args.dtype = device_and_dtype(p, args.device, args.dtype)
    if args.compile and (missing := compile_toolchain_missing(args.device)):
        log(args, f"warning: --compile needs {missing}; training without torch.compile")
        args.compile = False
    return args


def main(argv=None):
    args = get_args(argv)
    args.device = init_distributed(args.device, args.world_size)
    os.makedirs(args.out_dir, exist_ok=True)
    cfg = tf.PRESETS[args.preset]["tokenizer"]
    cfg = replace(cfg, **CODEBOOKS[args.codebook], codebook_size=args.codebook_size or cfg.codebook_size)
    cfg = tf.enhanced_decoder(cfg) if args.enhanced_decoder else cfg
    run = {"teacher": lambda: train_teacher(args, cfg), "tokenizer": lambda: train_tokenizer(args, cfg),
           "decoder": lambda: finetune_decoder(args, cfg), "judge": lambda: train_judge(args, cfg),
           "gpt": lambda: train_gpt(args, cfg, tf.PRESETS[args.preset]["gpt"]),
           "unified": lambda: train_unified(args, cfg, tf.PRESETS[args.preset]["gpt"])}
    try:
        log(args, describe(args.dataset, args.data_path, cfg.image_size, args.seed, args.eval_images, args.out_dir))
        return {stage: run[stage]() for stage in stages(args)}
    finally:
        destroy_distributed()


def cli(argv=None):
    """The command line: bad input ends in one line and exit code 2, a diverged run (NonFiniteLoss) in 1."""
    return run_script(main, argv, exit_codes=[(NonFiniteLoss, 1)])


if __name__ == "__main__":
    cli()
