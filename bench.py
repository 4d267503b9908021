"""
Measurements, one JSON object per line.

    python bench.py estimate    # tokenflow-b: FLOPs, saved activations and per-GPU memory of a training step

`estimate` counts what one training image costs at the tokenflow-b sizes (on CPU, batch 1): the
FLOPs of forward + backward (torch's FlopCounterMode), the bytes of the tensors autograd saves for
backward (fp32), and the bytes that do not grow with the batch (weights, gradients, AdamW state
and the EMA copy of what trains; the frozen networks). From these and an assumed accelerator it
derives the memory and time per step of the README's ImageNet commands; those two are estimates
and are labelled so.
"""

import argparse
import json
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import tokenflow as tf
import train

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM
ASSUMED_UTILISATION = 0.35  # a typical fraction of that peak for mixed conv / attention training


def count(module):
    return sum(p.numel() for p in module.parameters())


def attention_flops(modules, trained):
    """FlopCounterMode has no formula for the CPU attention kernel, so count it by hand: per call,
    q k^T and attn v are 2 * 2 * B * N^2 * D FLOPs forward; backward is twice that where the
    attention trains (its inputs need gradients). -> (list that fills during the step, hooks)."""
    calls = []

    def hook(module, inputs, output):
        B, N, D = inputs[0].shape
        calls.append(4 * B * N * N * D * (3 if trained else 1))

    return calls, [m.register_forward_hook(hook) for m in modules if isinstance(m, tf.Attention)]


def measure(step, params, trained_modules=(), frozen_modules=()):
    """Run step() once -> (FLOPs, bytes of activations saved for backward, excluding weights)."""
    weights = {p.untyped_storage().data_ptr() for p in params}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    attn, hooks = [], []
    for modules, trained in ((trained_modules, True), (frozen_modules, False)):
        for m in modules:
            calls, h = attention_flops(m.modules(), trained)
            attn.append(calls)
            hooks += h
    with FlopCounterMode(display=False) as flops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    for h in hooks:
        h.remove()
    return flops.get_total_flops() + sum(sum(c) for c in attn), sum(saved.values())


def tokenizer_step(cfg):
    """One image through the whole TokenFlow-B recipe: CLIP-sized teacher (frozen), tokenizer,
    L2 + LPIPS + semantic + VQ, and the PatchGAN's discriminator step and generator term."""
    torch.manual_seed(0)
    teacher, tokenizer, lpips = tf.Teacher(cfg).requires_grad_(False), tf.TokenFlow(cfg), train.LPIPS()
    disc = train.PatchDiscriminator()
    gan = {"disc": disc, "net": train.DiscriminatorLoss(disc), "opt": torch.optim.SGD(disc.parameters(), lr=0)}
    args = SimpleNamespace(disc_start=0, disc_weight=0.5, adaptive_disc_weight=False)
    x = torch.rand(1, 3, cfg.image_size, cfg.image_size) * 2 - 1

    def step():
        with torch.no_grad():
            target = teacher.features(x)
        x_rec, sem, stats = tokenizer(x)
        rec, _ = train.reconstruction_loss(args, x_rec, x, 0, lpips, gan, tokenizer.pix_dec.conv_out.weight)
        (rec + (1 - F.cosine_similarity(sem, target, dim=-1)).mean() + stats["vq"]).backward()

    trained, frozen = count(tokenizer) + count(disc), count(teacher) + count(lpips)
    flops, act = measure(step, [*tokenizer.parameters(), *disc.parameters(), *teacher.parameters(),
                                *lpips.parameters()], trained_modules=[tokenizer], frozen_modules=[teacher])
    return {"trained_params": trained, "frozen_params": frozen, "flops_per_image": flops, "act_bytes_per_image": act}


def gpt_step(cfg, gpt_cfg):
    """One sequence (all 561 tokens at 224 px) through the VAR-d16 GPT: forward, loss, backward."""
    torch.manual_seed(0)
    tokenizer = tf.TokenFlow(cfg).requires_grad_(False)  # on the GPU too: it tokenizes and decodes samples
    gpt = tf.GPT(gpt_cfg, tokenizer)
    idx = torch.randint(0, cfg.codebook_size, (1, cfg.seq_len))

    def step():
        F.cross_entropy(gpt(idx, torch.zeros(1, dtype=torch.long)).flatten(0, 1), idx.flatten()).backward()

    flops, act = measure(step, list(gpt.parameters()), trained_modules=[gpt])
    return {"trained_params": count(gpt), "frozen_params": count(tokenizer), "flops_per_image": flops,
            "act_bytes_per_image": act}


def estimate(per_gpu_batch):
    preset = tf.PRESETS["tokenflow-b"]
    gpt_cfg = preset["gpt"]
    gpt_cfg = type(gpt_cfg)(**{**gpt_cfg.__dict__, "num_classes": 1000})
    for stage, fn in (("tokenizer", lambda: tokenizer_step(preset["tokenizer"])),
                      ("gpt", lambda: gpt_step(preset["tokenizer"], gpt_cfg))):
        t0 = time.time()
        row = fn()
        b = per_gpu_batch[stage]
        # fp32 weight, gradient (in DDP's buckets), 2 AdamW moments, EMA of what trains; frozen weights
        static = 20 * row["trained_params"] + 4 * row["frozen_params"]
        row.update(bench="estimate", stage=stage, per_gpu_batch=b, static_gb=round(static / 1e9, 2),
                   est_fp32_act_gb=round(b * row["act_bytes_per_image"] / 1e9, 1),
                   est_step_s_h100=round(b * row["flops_per_image"] / (H100_BF16_FLOPS * ASSUMED_UTILISATION), 3),
                   assumed_utilisation=ASSUMED_UTILISATION, measured_s=round(time.time() - t0, 1))
        print(json.dumps(row), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="estimate", choices=["estimate"])
    p.add_argument("--gpus", type=int, default=8, help="GPUs the global batches of train.py's DEFAULTS spread over")
    args = p.parse_args(argv)
    batch = {s: train.DEFAULTS[("tokenflow-b", s)]["batch_size"] // args.gpus for s in ("tokenizer", "gpt")}
    estimate(batch)


if __name__ == "__main__":
    main()
