"""
Measurements, one JSON object per line: our code against a baseline measured in the same run.

    python bench.py             # vq, sample and train: ours against baselines in the same run
    python bench.py vq          # the quantizer's training step vs the matmul+argmax floor and the naive way
    python bench.py sample      # cached generation vs one teacher-forced forward (floor) and no cache
    python bench.py train       # toy training steps with the data pipeline vs batches already in memory
    python bench.py train --preset tokenflow-b --batch-size 2   # the B sizes at a reduced batch
    python bench.py estimate    # tokenflow-b: FLOPs, saved activations and per-GPU memory of a training step
    python bench.py profile --preset tokenflow-b --batch-size 64   # the top 15 kernels of a tokenizer and a GPT step

Times are medians of --repeats runs after one warm-up; `spread` is (max - min) / median (a 2-core
CPU is noisy: runs differ by 20-40%). ratio = ours_s / baseline_s. peak_mb is the peak memory the
call adds: CUDA's allocator peak on a GPU, the process's peak resident memory (Linux VmHWM, reset
before the call) on CPU.

The baselines:
- vq, floor: one matmul + argmax of all rows; naive: the official way, two N x K distance
  matrices, an N x K one-hot and `unique` over a 131,072-id usage window (naive_quantize).
  Ours is one fp32 matmul of the unit codes against both tables at once (argmin d_sem + w d_pix
  is the argmax of one inner product for unit vectors), in row chunks (cache-sized on a CPU, up to
  1 GiB of scores on a GPU), with no one-hot and no distance matrix, so its speed-up over naive is
  capped by naive / floor.
- sample, floor: one teacher-forced forward at the sampling batch + sampling every token; no
  cache: every scale re-runs the whole prefix (generate_no_cache). Without the cache scale k
  re-runs all tokens up to its own: 1 + 5 + 21 + ... + 561 = 1,352 token positions against 561,
  so whatever grows linearly with tokens (the K-way head, the MLPs) gains at most 1352 / 561 =
  2.4x; only attention adds more. Greedy samples must be identical both ways (same_greedy_samples).
- train: the same step with the batch already in memory (no data pipeline); on CUDA in bf16 it
  also prints achieved TFLOP/s and MFU.

`profile` prints tables rather than JSON: torch.profiler's ops of one training step of each stage (as
`train` builds them), sorted by self time on the device (CUDA kernels on a GPU).

`estimate` counts what one training image costs at the tokenflow-b sizes (on CPU, batch 1): the
FLOPs of forward + backward (torch's FlopCounterMode), the bytes of the tensors autograd saves for
backward (fp32), and the bytes that do not grow with the batch (weights, gradients, AdamW state
and the EMA copy of what trains; the frozen networks). From these and an assumed accelerator it
derives the memory and time per step of the ImageNet commands (data/imagenet/README.md); those
two are estimates and are labelled so.
"""

import json
import os
import re
import statistics
import time
from dataclasses import replace

import torch
import numpy as np
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import tokenflow as tf
import train
from data import TokenDataset, device_batches
from data.shapes import ShapesDataset
from utils.cli import OneLineErrors, check_device, run_script
from utils.weights import LPIPS
from metrics import autocast_ctx

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM
ASSUMED_UTILISATION = 0.35  # a typical fraction of that peak for mixed conv / attention training


# ---------------------------------------------------------------------------------------------
# Timing and peak memory


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, repeats, device):
    """fn() once to warm up, then `repeats` times -> (median seconds, spread = (max - min) / median)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return median, (max(times) - min(times)) / median


def rss_mb(key):
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024


def peak_mb(fn, device):
    """Peak memory fn() adds, in MB (None where it cannot be read: CPU off Linux)."""
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    base = rss_mb("VmRSS")
    fn()
    return round(rss_mb("VmHWM") - base, 1)


def report(bench, baseline, ours, theirs, ours_mb=None, theirs_mb=None, **extra):
    """One JSON line for (benchmark, baseline): ours and theirs are (median s, spread)."""
    print(json.dumps({"bench": bench, "baseline": baseline, "ours_s": round(ours[0], 5), "baseline_s": round(theirs[0], 5),
                      "ratio": round(ours[0] / theirs[0], 3), "ours_spread": round(ours[1], 3),
                      "baseline_spread": round(theirs[1], 3), "peak_mb": ours_mb, "baseline_peak_mb": theirs_mb,
                      **extra}), flush=True)


# ---------------------------------------------------------------------------------------------
# vq: the quantizer's training step at the tokenflow-b shapes


def naive_quantize(codebook, z_BCnn, scales, window):
    """The quantizer as the official TokenFlow code computes it, our baseline: per scale, the two
    squared-distance matrices ||z||^2 + ||e||^2 - 2 z e (N x K each) and their weighted sum, an
    N x K one-hot of the argmin, the codes as one-hot @ table, and codebook usage by `unique` over
    the last `window` ids. -> (f_hat, [ids (B, s*s)], vq loss, usage)."""
    B, C, n, _ = z_BCnn.shape
    sem_dim, K = codebook.sem.shape[1], codebook.sem.shape[0]
    e_sem, e_pix = F.normalize(codebook.sem, dim=1), F.normalize(codebook.pix, dim=1)
    residual, f_hat, ids, vq, recent = z_BCnn, torch.zeros_like(z_BCnn), [], 0, window
    for s in scales:
        r = F.interpolate(residual, size=(s, s), mode="area").permute(0, 2, 3, 1).reshape(-1, C)
        z_sem, z_pix = F.normalize(r[:, :sem_dim], dim=1), F.normalize(r[:, sem_dim:], dim=1)
        d_sem = z_sem.pow(2).sum(1, keepdim=True) + e_sem.pow(2).sum(1) - 2 * z_sem @ e_sem.T  # (N, K)
        d_pix = z_pix.pow(2).sum(1, keepdim=True) + e_pix.pow(2).sum(1) - 2 * z_pix @ e_pix.T  # (N, K)
        idx = (d_sem + codebook.pix_weight * d_pix).argmin(1)
        one_hot = torch.zeros(len(idx), K, device=idx.device).scatter_(1, idx[:, None], 1)  # (N, K)
        z = torch.cat([z_sem, z_pix], 1)
        q = one_hot @ torch.cat([e_sem, e_pix], 1)  # (N, C)
        vq = vq + F.mse_loss(q, z.detach()) + codebook.beta * F.mse_loss(z, q.detach())
        q = z + (q - z).detach()
        q_BCnn = tf.upsample(q.view(B, s, s, C).permute(0, 3, 1, 2), n)
        f_hat, residual = f_hat + q_BCnn, residual - q_BCnn.detach()
        ids.append(idx.view(B, s * s))
        recent = torch.cat([recent, idx])[-window.numel():]
    usage = torch.unique(recent).numel() / K
    return f_hat, ids, vq / len(scales), usage


class CodebookOnly(torch.nn.Module):
    """What TokenFlow.quantize and GPT read of a tokenizer (its config and codebook), without the
    encoders and decoders of the B sizes."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.codebook = cfg, tf.DualCodebook(cfg.codebook_size, cfg.sem_dim, cfg.pix_dim)


def bench_vq(args):
    cfg = tf.PRESETS["tokenflow-b"]["tokenizer"]
    torch.manual_seed(0)
    quantizer = CodebookOnly(cfg).to(args.device)
    codebook = quantizer.codebook
    z = torch.randn(8, cfg.sem_dim + cfg.pix_dim, cfg.grid, cfg.grid, device=args.device, requires_grad=True)
    window = torch.randint(0, cfg.codebook_size, (131_072,), device=args.device)  # the official usage window

    def ours():
        f_hat, _, stats = tf.TokenFlow.quantize(quantizer, z, cfg.scales)
        (f_hat.square().mean() + stats["vq"]).backward()

    def naive():
        f_hat, _, vq, _ = naive_quantize(codebook, z, cfg.scales, window)
        (f_hat.square().mean() + vq).backward()

    N = 8 * cfg.seq_len  # every scale's rows at once
    u = F.normalize(torch.randn(N, cfg.sem_dim + cfg.pix_dim, device=args.device), dim=1)
    e = F.normalize(torch.randn(cfg.sem_dim + cfg.pix_dim, cfg.codebook_size, device=args.device), dim=0)
    floor = lambda: (u @ e).argmax(1)
    mine = timed(ours, args.repeats, args.device), peak_mb(ours, args.device)
    shape = dict(batch=8, K=cfg.codebook_size, dims=[cfg.sem_dim, cfg.pix_dim], rows=N, device=args.device)
    report("vq", "floor", mine[0], timed(floor, args.repeats, args.device), mine[1], peak_mb(floor, args.device), **shape)
    report("vq", "naive", mine[0], timed(naive, args.repeats, args.device), mine[1], peak_mb(naive, args.device), **shape)


# ---------------------------------------------------------------------------------------------
# sample: cached class-conditional generation at the tokenflow-b scales


@torch.no_grad()
def generate_no_cache(gpt, labels, cfg_scale, top_k, top_p, generator):
    """GPT.generate's math with guidance on the linear schedule, the way the official sampler runs
    it: every scale runs a plain forward over the whole prefix (no KV cache) and keeps the logits
    of its own tokens. Our baseline."""
    B, S, n = len(labels), len(gpt.scales), gpt.grid
    rows = torch.cat([labels, torch.full_like(labels, gpt.cfg.num_classes)])
    class_BD = gpt.class_emb(rows)
    inputs, f_hat, start, out = [gpt.start_tokens(class_BD)], gpt.codes.new_zeros(B, gpt.codes.shape[1], n, n), 0, []
    for si, s in enumerate(gpt.scales):
        end = start + s * s
        x = gpt.embed(torch.cat(inputs, 1), 0)  # (2B, end, D)
        logits = gpt.head(gpt.transformer(x, class_BD, mask=gpt.mask[:end, :end])).float()  # a plain forward, whole prefix
        cond, uncond = logits[:, start:end].chunk(2)
        t = cfg_scale * si / max(1, S - 1)
        idx = tf.sample_logits((cond + t * (cond - uncond)).flatten(0, 1), 1.0, top_k, top_p, generator)
        idx = idx.view(B, s * s)
        f_hat = tf.add_scale(f_hat, gpt.scale_codes(idx, s))
        out.append(idx)
        start = end
        if si + 1 < S:
            inputs.append(gpt.next_input(f_hat, gpt.scales[si + 1]).repeat(2, 1, 1))
    return torch.cat(out, 1)


def bench_sample(args):
    cfg = tf.PRESETS["tokenflow-b"]["tokenizer"]
    gpt_cfg = tf.GPTConfig(num_classes=1000, width=args.gpt_width, depth=args.gpt_depth, heads=args.gpt_width // 64)
    torch.manual_seed(0)
    gpt = tf.GPT(gpt_cfg, CodebookOnly(cfg)).to(args.device).eval()
    labels = torch.arange(8, device=args.device)
    kw = dict(cfg_scale=3.0, top_k=600, top_p=0.8)
    gen = lambda: torch.Generator(args.device).manual_seed(0)
    ours = lambda: gpt.generate(labels, generator=gen(), **kw)
    no_cache = lambda: generate_no_cache(gpt, labels, generator=gen(), **kw)
    idx16 = torch.randint(0, cfg.codebook_size, (16, cfg.seq_len), device=args.device)
    logits8 = torch.randn(8 * cfg.seq_len, cfg.codebook_size, device=args.device)

    @torch.no_grad()
    def floor():  # one teacher-forced forward of all 561 tokens at batch 16, then sampling 561 tokens of 8 images
        gpt(idx16, torch.cat([labels, torch.full_like(labels, 1000)]))
        tf.sample_logits(logits8, 1.0, kw["top_k"], kw["top_p"], gen())

    mine = timed(ours, args.repeats, args.device), peak_mb(ours, args.device)
    shape = dict(images=8, batch_inside=16, L=cfg.seq_len, K=cfg.codebook_size, top_k=kw["top_k"], top_p=kw["top_p"],
                 gpt=f"width {gpt_cfg.width}, depth {gpt_cfg.depth}, {count(gpt) / 1e6:.1f}M",
                 device=args.device)
    report("sample", "floor", mine[0], timed(floor, args.repeats, args.device), mine[1], peak_mb(floor, args.device), **shape)
    report("sample", "no-cache", mine[0], timed(no_cache, args.repeats, args.device), mine[1],
           peak_mb(no_cache, args.device), same_samples=bool(torch.equal(ours(), no_cache())),
           same_greedy_samples=bool(torch.equal(gpt.generate(labels, cfg_scale=3.0, top_k=1),
                                                 generate_no_cache(gpt, labels, 3.0, 1, 0.0, None))), **shape)


# ---------------------------------------------------------------------------------------------
# train: toy training steps, data pipeline on vs batches already in memory


def train_steps(args, stage):
    """-> (step(x, y), the real pipeline's batches, batch size, trained module, frozen modules) for
    a stage of --preset: the tokenizer reads shapes rendered on the fly, the GPT random token ids
    from memory through the DataLoader."""
    preset = tf.PRESETS[args.preset]
    cfg = preset["tokenizer"]
    batch = args.batch_size or train.DEFAULTS[(args.preset, stage)]["batch_size"]
    torch.manual_seed(0)
    tokenizer, frozen = tf.TokenFlow(cfg).to(args.device), []
    if stage == "tokenizer":
        teacher = tf.Teacher(cfg).to(args.device).requires_grad_(False)
        model, frozen = tokenizer, [teacher]
        data = device_batches(ShapesDataset(1_000_000, cfg.image_size, 0, "train"), batch, 0, device=args.device)

        def loss_fn(x, y):
            with torch.no_grad():
                target = teacher.features(x)
            x_rec, sem, stats = tokenizer(x)
            return train.tokenizer_loss(x, x_rec, sem, target, stats["vq"])[0]
    else:
        model = tf.GPT(replace(preset["gpt"], num_classes=8), tokenizer.requires_grad_(False)).to(args.device)
        ids = np.random.default_rng(0).integers(0, cfg.codebook_size, (8192, cfg.seq_len)).astype(np.uint16)
        data = device_batches(TokenDataset(ids, np.arange(8192) % 8), batch, 0, device=args.device)
        loss_fn = lambda idx, y: tf.gpt_loss(model(idx, y), idx)
    if args.device.startswith("cuda"):
        tf.channels_last(model)  # as train.py's wrap: cuDNN's NHWC convs, a GroupNorm that keeps the layout
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x, y):
        with autocast_ctx(args.device, args.dtype):
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, data, batch, model, frozen


PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312}  # dense bf16 peaks, for model FLOPs utilisation


def bench_train(args):
    for stage in ("tokenizer", "gpt"):
        step, data, batch, model, frozen = train_steps(args, stage)
        fixed = next(data)
        with_data = timed(lambda: step(*next(data)), args.repeats * 4, args.device)
        in_memory = timed(lambda: step(*fixed), args.repeats * 4, args.device)
        flops, _ = measure(lambda: step(*fixed), list(model.parameters()), trained_modules=[model], frozen_modules=frozen)
        extra = {"images_per_s": round(batch / with_data[0], 1), "tflops_per_s": round(flops / with_data[0] / 1e12, 3)}
        if stage == "gpt":
            extra["tokens_per_s"] = round(batch * tf.PRESETS[args.preset]["tokenizer"].seq_len / with_data[0])
        peak = [v for k, v in PEAK_TFLOPS.items() if args.device.startswith("cuda") and k in torch.cuda.get_device_name()]
        if peak and args.dtype == "bfloat16":
            extra["mfu"] = round(extra["tflops_per_s"] / peak[0], 3)
        report("train", "data-in-memory", with_data, in_memory, stage=f"{args.preset} {stage}", batch=batch, **extra,
               dtype=args.dtype, device=args.device)


# ---------------------------------------------------------------------------------------------
# profile: where the time of one training step goes


def profile(args, top=15):
    """One tokenizer and one GPT training step of --preset under torch.profiler, after a warm-up step
    (cuDNN's algorithm search, the allocator) -> per stage, a table of the `top` ops by self time on the
    device: CUDA kernels on a GPU, CPU ops on the CPU."""
    cuda = args.device.startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    for stage in ("tokenizer", "gpt"):
        step, data, batch, _, _ = train_steps(args, stage)
        x, y = next(data)
        step(x, y)
        sync(args.device)
        with torch.profiler.profile(activities=activities) as prof:
            step(x, y)
            sync(args.device)
        print(f"profile: {args.preset} {stage}, one training step at batch {batch}, {args.dtype}, {args.device}")
        print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                        row_limit=top), flush=True)


# ---------------------------------------------------------------------------------------------
# estimate: FLOPs and memory of a tokenflow-b training step, counted on CPU


def count(module):
    return sum(p.numel() for p in module.parameters())


def attention_flops(modules, trained):
    """FlopCounterMode has no formula for the CPU attention kernel (it has CUDA's), so count it by hand: per call,
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
    counted = any("attention" in str(op) for ops in flops.get_flop_counts().values() for op in ops)  # CUDA kernels
    return flops.get_total_flops() + (0 if counted else sum(sum(c) for c in attn)), sum(saved.values())


def tokenizer_step(cfg):
    """One image through the whole TokenFlow-B recipe: CLIP-sized teacher (frozen), tokenizer,
    L2 + LPIPS + semantic + VQ, and the PatchGAN's two hinge terms (generator and discriminator,
    one backward, as train.py's tokenizer_loss)."""
    torch.manual_seed(0)
    teacher, tokenizer, lpips = tf.Teacher(cfg).requires_grad_(False), tf.TokenFlow(cfg), LPIPS()
    disc = tf.PatchDiscriminator()
    gan = train.GAN(disc, train.DiscriminatorLoss(disc), torch.optim.SGD(disc.parameters(), lr=0))
    x = torch.rand(1, 3, cfg.image_size, cfg.image_size) * 2 - 1

    def step():
        with torch.no_grad():
            target = teacher.features(x)
        x_rec, sem, stats = tokenizer(x)  # the discriminator's hinge loss is part of tokenizer_loss's sum
        loss, _ = train.tokenizer_loss(x, x_rec, sem, target, stats["vq"], lpips, gan, tokenizer.pix_dec.conv_out.weight)
        loss.backward()

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
    gpt_cfg = replace(preset["gpt"], num_classes=1000)
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
    p = OneLineErrors(__doc__)
    p.add_argument("what", nargs="?", default="all", choices=["all", "vq", "sample", "train", "estimate", "profile"])
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the median is reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gpt-width", type=int, default=256, help="sample: GPT width (heads = width / 64)")
    p.add_argument("--gpt-depth", type=int, default=4, help="sample: GPT blocks")
    p.add_argument("--preset", default="toy", choices=sorted(tf.PRESETS), help="train, profile: model sizes")
    p.add_argument("--batch-size", type=int, default=None,
                   help="train, profile: batch (default: the preset's, as train.py)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="train, profile: autocast dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--gpus", type=int, default=8, help="estimate: GPUs the global batches of train.py's DEFAULTS spread over")
    args = p.parse_args(argv)
    width_ok = args.gpt_width >= 64 and args.gpt_width % 64 == 0  # heads of 64
    if min(args.repeats, args.gpus, args.gpt_depth, args.batch_size or 1) < 1 or not width_ok:
        p.error("--repeats, --gpus, --gpt-depth and --batch-size must be >= 1 and --gpt-width a multiple of 64")
    check_device(p, args.device)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    run = {"vq": bench_vq, "sample": bench_sample, "train": bench_train, "profile": profile,
           "estimate": lambda a: estimate({s: train.DEFAULTS[("tokenflow-b", s)]["batch_size"] // a.gpus
                                           for s in ("tokenizer", "gpt")})}
    for what in (["vq", "sample", "train"] if args.what == "all" else [args.what]):
        run[what](args)


if __name__ == "__main__":
    run_script(main)  # bad input: one line, exit code 2
