"""
Metrics: the numbers train.py logs at each evaluation and evaluate.py reports, as functions of
models and data with explicit parameters (no command line here). Held-out tokenizer, teacher, judge
and GPT metrics take a reduce function that sums a tensor over ranks (utils.distributed.all_sum
under torchrun, each rank with its share of the loader). Definitions: evaluate.py's docstring.
"""

import inspect
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

import tokenflow as tf
from data import eval_loader
from data.shapes import COLOURS, HELD_OUT_PAIRS, PALETTE, SHAPES, VOCAB, held_out_pair
from utils.grids import class_rows, keep_class_examples, save_grid

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
        sums["psnr"] += psnr(x_rec, x).clamp_max(100).sum().item()  # an exact copy is inf dB: keep the mean finite
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
def evaluate_unified(model, loader, device, dtype="float32", reduce=lambda t: t):
    """Held-out losses (nats) of a UnifiedGPT on a loader of (ids (B, L), captions (B, W)): gen_loss per
    image token (text-to-image), cap_loss per caption word and END (image-to-text, both halves; each
    batch's mean weighted by its images: per word where captions have one length, as the shapes')."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # gen, cap: batch means x images; images
    for idx, words in loader:
        idx, words = idx.to(device), words.to(device)
        with autocast_ctx(device, dtype):
            image_logits, word_logits = model(idx, words)
        losses = [tf.gpt_loss(image_logits, idx).item(), tf.caption_loss(word_logits, words).item()]
        sums += torch.tensor([loss * len(idx) for loss in losses] + [len(idx)])
    gen, cap, n = reduce(sums).tolist()
    return {"gen_loss": gen / n, "cap_loss": cap / n}


@torch.no_grad()
def caption_scores(model, ids_NL, words_NW, device, batch_size=256):
    """Captions (greedy) of held-out images' ids, read through each view of f_hat, against their true
    captions "<colour> <shape>" -> caption_shape_acc, caption_colour_acc, caption_exact_acc (suffix _sem,
    _pix: that half alone) on images of seen pairs, and caption_exact_acc_heldout (both halves) on
    images of HELD_OUT_PAIRS."""
    model.eval()
    unseen, row = held_out_pair(words_NW), {}
    for view in model.VIEWS:
        said = torch.cat([model.caption(ids.to(device), view).cpu() for ids in ids_NL.split(batch_size)])
        right = said == words_NW  # (N, 2): colour, shape
        suffix = "" if view == "both" else f"_{view}"
        row.update({f"caption_shape_acc{suffix}": right[~unseen, 1].float().mean().item(),
                    f"caption_colour_acc{suffix}": right[~unseen, 0].float().mean().item(),
                    f"caption_exact_acc{suffix}": right[~unseen].all(1).float().mean().item()})
        if view == "both":
            row["caption_exact_acc_heldout"] = right[unseen].all(1).float().mean().item()
    return {**row, "caption_images": int((~unseen).sum()), "caption_images_heldout": int(unseen.sum())}


def pair_prompts(per_seen=5, per_held_out=32):
    """Captions for text-to-image scoring: every seen (colour, shape) pair per_seen times, then every held-out
    pair per_held_out times -> word ids (N, 2), held out? (N,)."""
    pairs = [(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES)) if (c, s) not in HELD_OUT_PAIRS]
    prompts = [p for p in pairs for _ in range(per_seen)] + [p for p in HELD_OUT_PAIRS for _ in range(per_held_out)]
    words = torch.tensor([[VOCAB.index(COLOURS[c]), VOCAB.index(SHAPES[s])] for c, s in prompts])
    return words, held_out_pair(words)


@torch.no_grad()
def t2i_scores(model, tokenizer, judge, seed, device, dtype="float32", batch_size=256, **options):
    """Text-to-image from pair_prompts (options: GPT.generate's), each image judged -> t2i_shape_acc (the
    judge reads the prompt's shape), t2i_colour_acc (foreground_colours finds its colour), t2i_joint_acc
    (both), on seen pairs and with suffix _heldout on held-out pairs; cfg, images of each."""
    words, unseen = pair_prompts()
    shape_right, colour_right = [], []
    for w, _, x in generated_batches(model, tokenizer, words, batch_size, seed, device, dtype, **options):
        shape_right.append((judge(x).argmax(1) == w[:, 1] - VOCAB.index(SHAPES[0])).cpu())
        colour_right.append(foreground_colours(x.cpu()) == w[:, 0].cpu() - VOCAB.index(COLOURS[0]))
    shape_right, colour_right = torch.cat(shape_right).float(), torch.cat(colour_right).float()
    row = {"cfg": options.get("cfg_scale", DEFAULT_CFG_SCALE)}
    for suffix, rows in (("", ~unseen), ("_heldout", unseen)):
        row.update({f"t2i_shape_acc{suffix}": shape_right[rows].mean().item(),
                    f"t2i_colour_acc{suffix}": colour_right[rows].mean().item(),
                    f"t2i_joint_acc{suffix}": (shape_right * colour_right)[rows].mean().item()})
    return {**row, "t2i_images": int((~unseen).sum()), "t2i_images_heldout": int(unseen.sum())}


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
    and the continuous teacher features (teacher None: none); each (B, d, n, n) map mean-pooled over
    the grid (pool 'mean') or flattened, position by position (pool 'grid')."""
    sem_dim, pix_dim, n = tokenizer.cfg.sem_dim, tokenizer.cfg.pix_dim, tokenizer.cfg.grid
    flat = (lambda f: f.mean((2, 3))) if pool == "mean" else (lambda f: f.flatten(1))
    feats, labels = {}, []
    for x, y in eval_loader(dataset, batch_size):
        x = x.to(device)
        with autocast_ctx(device, dtype):
            f = tokenizer.indices_to_features(tokenizer.encode(x)).float()  # (B, C, n, n)
            t = teacher.features(x).float().transpose(1, 2).unflatten(2, (n, n)) if teacher else None  # (B, T, n, n)
        kinds = {"semantic": f[:, :sem_dim] if sem_dim else None, "pixel": f[:, sem_dim:] if pix_dim else None,
                 "both": f if sem_dim and pix_dim else None, "teacher": t}
        for kind, v in kinds.items():
            if v is not None:
                feats.setdefault(kind, []).append(flat(v).cpu())
        labels.append(y)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


# ---------------------------------------------------------------------------------------------
# Image and code measures


def psnr(x, y):
    """Per-image PSNR in dB of [-1, 1] images (B, 3, H, W) -> (B,), measured on [0, 1] with data
    range 1 (inf if identical)."""
    return -10 * torch.log10(((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1))


def foreground_colours(x_B3HW, min_saturation=0.3, min_pixels=4):
    """The palette colour of each image's shape -> (B,) indices into PALETTE, -1 where fewer than
    min_pixels are saturated. The backgrounds are grey (saturation, max - min over RGB in [0, 1],
    at most 0.1) and every palette colour is saturated (>= 0.48 with jitter), so the shape's pixels
    are the saturated ones; the nearest palette colour to their median is the answer. Images in
    [-1, 1], real or generated."""
    x = (x_B3HW.float().clamp(-1, 1) + 1) / 2
    saturated = (x.amax(1) - x.amin(1)) > min_saturation  # (B, H, W)
    palette, out = torch.from_numpy(PALETTE).to(x.device), []
    for image, mask in zip(x, saturated):
        if mask.sum() < min_pixels:
            out.append(-1)
            continue
        colour = image[:, mask].median(dim=1).values  # (3,)
        out.append(int((palette - colour).square().sum(1).argmin()))
    return torch.tensor(out)


def colour_coverage(colours_N, labels_N):
    """The diversity guard of generated shapes (issue 14): colour is drawn independently of the
    class, so each class's samples should show many of the 8 palette colours; a generator that
    draws one image per class shows one. -> distinct foreground colours per class (-1, no shape,
    not counted), averaged over the classes present."""
    per_class = [len(set(colours_N[labels_N == c].tolist()) - {-1}) for c in labels_N.unique().tolist()]
    return sum(per_class) / len(per_class)


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
