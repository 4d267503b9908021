"""
Invariants of the tokenizer and the training script, on tiny CPU configs.

    python -m pytest -q test_tokenflow.py

The robustness guarantees of the scripts, each tested below:
- Checkpoints are written to a temporary file, flushed, fsynced and renamed, so a kill
  mid-write leaves the previous one whole. Every load goes through
  torch.load(weights_only=True); a file whose unpickling would run code is refused, as is a
  checkpoint of the wrong kind or with another config (the message names both values).
- Exact resume. For the tokenizer and GPT stages on CPU, 6 steps in one run and 3 steps,
  SIGKILL, --resume, 3 steps give the same weights (max difference ≤ 1e-6) and the same
  metrics.jsonl rows: data order, optimiser, scaler, EMA, discriminator and the random state
  (scale drop, class drop, augmentation in the main process) all resume. With
  --num-workers > 0 the crops of the resumed epoch differ (workers reseed per epoch), and under
  torchrun every rank resumes with rank 0's random state.
- Signals. SIGINT (Ctrl-C) or SIGTERM finishes the current step, writes a checkpoint, prints
  <stage>: SIGTERM at step N: checkpoint written to ... and exits with 128 + the signal number;
  a second signal stops at once, the usual way.
- Bad data. In a folder dataset, zero-byte, truncated, non-image and unreadable files are
  replaced by the next readable file with one warning line each, and the epoch ends with a
  count (100 unreadable files in a row stop the run: a dead disk, not bad files). Grey, RGBA
  (over white), palette, CMYK and 16-bit images become RGB, EXIF orientation is applied, small
  images are upscaled. A folder without class folders, without images, or
  with no readable image stops with a message.
- Numerics. A step whose loss (or, without fp16's scaler, gradient norm) is not finite is
  skipped on every rank and counted (skipped_steps in the stage's last metrics row); 10 in a
  row stop the run, naming the last good checkpoint, which is not overwritten.
- DDP. Two Gloo processes with global batch 8 train a teacher and a tokenizer that compute
  the same outputs (1e-4) as one process with batch 8, with the same held-out metrics and the
  same files, written by rank 0. (Not bit-equal weights: a bias right before a per-channel norm
  gets a zero gradient plus rounding noise, which Adam turns into full-size steps of random
  sign; such a bias does not change any output.) When one rank fails, all exit within seconds
  (tested with Gloo; under NCCL a rank blocked in a collective waits for torchrun to kill it).
- Input. Bad flags, unknown presets, batch sizes that do not divide, id files of the wrong
  length or range, class labels out of range, and missing or mismatched weight files stop with
  one line naming the fix and exit code 2, as does running out of GPU memory (naming --batch-size
  and --grad-accum). Every flag of train.py, sample.py and evaluate.py is run over a table of
  hostile values (NaN, +-inf, 0, -1, 1e30, empty, missing, a folder, a file of the wrong kind):
  exit code 0 or 2, never a traceback (--compile: parsed only; without a compiler it warns).
- Bad input from the field (issue 15): held-out class folders map onto the training split's by
  name; folder scans follow links, skip hidden names and notice any change; any exception from
  one image file skips that file; state dicts of DDP / torch.compile models load; the sampler
  never meets NaN; a missing checkpoint names the command that writes it.

Sampling and evaluation (sample.py, evaluate.py): labels beyond the null class, id files of the wrong length or range,
unreadable images, and a GPT trained on another tokenizer's ids stop with one line and exit
code 2.
"""

import copy
import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import signal
import struct
import tarfile
import time
import urllib.error
import zipfile
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tqdm
from PIL import Image

import data
import evaluate
import metrics
import sample
import tokenflow as tf
import train
import utils.checkpoints
import utils.cli
import utils.train_state
import utils.weights
from data import device_batches, fashion_mnist, shapes
from data.folders import FolderDataset, read_rgb
from data.shapes import ShapesDataset
from metrics import colour_coverage, foreground_colours
from utils.checkpoints import config_diff, load_checkpoint, load_model, save_checkpoint, tokenizer_id
from utils.grids import class_rows, keep_class_examples, to_uint8

HERE = os.path.dirname(os.path.abspath(__file__))

TINY = tf.TokenizerConfig(
    image_size=16, patch_size=4, vit_width=32, vit_depth=1, vit_heads=2, vit_stem_ch=32, teacher_dim=16,
    sem_mean=(0.5, 0.5, 0.5), sem_std=(0.5, 0.5, 0.5), pix_ch=32, pix_ch_mult=(1, 2, 2), pix_res_blocks=1,
    z_channels=32, pix_dec_ch=32, pix_dec_res_blocks=0, codebook_size=64, scales=(1, 2, 4), sem_dec_depth=1)


def images(B, size=16, seed=0):
    return torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------
# CLIP weights


class ClipVisual(torch.nn.Module):
    """OpenAI CLIP's image tower with its own attribute names and forward (LND, nn.MultiheadAttention)."""

    def __init__(self, width=64, layers=2, patch=4, grid=3, out=16):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = torch.nn.Parameter(torch.randn(width) * 0.2)
        self.positional_embedding = torch.nn.Parameter(torch.randn(grid * grid + 1, width) * 0.2)
        self.ln_pre, self.ln_post = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.Sequential(*[ClipBlock(width) for _ in range(layers)])
        self.proj = torch.nn.Parameter(torch.randn(width, out) * 0.1)

    def forward(self, x):  # -> patch tokens after ln_post (B, N, width)
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], 1) + self.positional_embedding
        x = self.transformer.resblocks(self.ln_pre(x).transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x[:, 1:])


class ClipBlock(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(width, width // 64)
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential()
        self.mlp.add_module("c_fc", torch.nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", tf.QuickGELU())
        self.mlp.add_module("c_proj", torch.nn.Linear(4 * width, width))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Clip(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = ClipVisual(width=128)
        self.logit_scale = torch.nn.Parameter(torch.ones(()))  # text-side keys are ignored

    def forward(self, x):
        return self.visual(x)


@pytest.mark.filterwarnings("ignore")  # tracing and torch.jit.save warn; the archive is what we need
@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "torchscript_fp16"])
def test_load_clip_matches_the_clip_forward(tmp_path, fmt):
    torch.manual_seed(0)
    clip, x, path = Clip().eval(), torch.randn(2, 3, 12, 12), str(tmp_path / "clip.pt")
    if fmt == "state_dict":
        torch.save(clip.state_dict(), path)
    else:  # the distributed format: a TorchScript archive; OpenAI's holds fp16 weights
        traced = torch.jit.trace(clip, x)
        torch.jit.save(traced.half() if fmt.endswith("fp16") else traced, path)
        clip = clip.half().float() if fmt.endswith("fp16") else clip  # the reference sees the same rounding
    vit = utils.weights.load_clip(path)
    assert len(vit.blocks) == 2 and vit.positional_embedding.shape == (10, 128)
    with torch.no_grad():
        assert torch.allclose(vit(x), clip.visual(x), atol=1e-4)
    assert torch.equal(vit.proj.weight, clip.visual.proj.detach().T)


def test_torchscript_weights_that_would_run_code_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with zipfile.ZipFile("evil.pt", "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps({"visual.conv1.weight": RunsCode()}, protocol=2))
        zf.writestr("evil/constants.pkl", pickle.dumps(()))
    with pytest.raises(pickle.UnpicklingError, match="no place in a weights file"):
        utils.weights.load_clip("evil.pt")
    assert not os.path.exists("pwned")


def test_clip_teacher_for_a_preset_and_its_checked_download(tmp_path, monkeypatch):
    """CLIP weights become the tokenizer stage's teacher: same features as CLIP on the same input."""
    torch.manual_seed(0)
    visual = ClipVisual(width=64, layers=2, patch=4, grid=4, out=16).eval()
    clip = Clip()
    clip.visual = visual
    path = str(tmp_path / "clip.pt")
    torch.save(clip.state_dict(), path)
    cfg = replace(TINY, vit_width=64, vit_depth=2, vit_heads=1, vit_stem_ch=0, vit_quick_gelu=True,
                  sem_mean=(0.48145466, 0.4578275, 0.40821073), sem_std=(0.26862954, 0.26130258, 0.27577711))
    teacher = utils.weights.clip_teacher(path, cfg).eval()
    x = images(2)
    with torch.no_grad():
        assert torch.allclose(teacher.features(x), visual(tf.teacher_input(x, cfg)) @ visual.proj, atol=1e-4)
    with pytest.raises(ValueError, match="vit_depth = 2 vs 3"):
        utils.weights.clip_teacher(path, replace(cfg, vit_depth=3))
    # --teacher clip-vit-b16: fetched once into the cache, then its SHA-256 is checked
    monkeypatch.setenv("TOKENFLOW_CACHE", str(tmp_path / "cache"))
    fake = "https://example.invalid/x/" + hashlib.sha256(open(path, "rb").read()).hexdigest() + "/ViT-B-16.pt"
    monkeypatch.setattr(utils.weights, "CLIP_URL", fake)
    monkeypatch.setattr(utils.weights.urllib.request, "urlretrieve", lambda url, dst: shutil.copy(path, dst))
    fetched = utils.weights.fetch_clip()
    assert open(fetched, "rb").read() == open(path, "rb").read()
    open(fetched, "ab").write(b"x")  # a corrupted cache
    with pytest.raises(ValueError, match="sha256"):
        utils.weights.fetch_clip()


def test_positions_resize_keeps_the_class_token_and_is_identity_at_the_same_grid():
    pos = torch.randn(1 + 14 * 14, 8)
    assert torch.equal(utils.weights.resize_positions(pos, 14), pos)
    big = utils.weights.resize_positions(pos, 16)
    assert big.shape == (1 + 16 * 16, 8) and torch.equal(big[0], pos[0])
    flat = torch.cat([pos[:1], torch.ones(14 * 14, 8)])  # a constant grid stays constant
    assert torch.allclose(utils.weights.resize_positions(flat, 16)[1:], torch.ones(16 * 16, 8), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Dual codebook


def brute_force(cb, z_sem, z_pix):
    """argmin_i ||z_sem - e_sem_i||^2 + w ||z_pix - e_pix_i||^2 over explicit distance matrices."""
    zs, zp = F.normalize(z_sem.double(), dim=1), F.normalize(z_pix.double(), dim=1)
    es, ep = F.normalize(cb.sem.double(), dim=1), F.normalize(cb.pix.double(), dim=1)
    d = torch.cdist(zs, es) ** 2 + cb.pix_weight * torch.cdist(zp, ep) ** 2  # (N, K)
    return d


@pytest.mark.parametrize("K,w,rows", [(512, 1.0, None), (512, 3.5, None), (70_000, 1.0, None),  # rows: chunks
                                       (4096, 0.25, 1), (512, 1.0, 7), (70_000, 1.0, 59)])
def test_shared_index_is_brute_force_argmin(K, w, rows):
    torch.manual_seed(K)
    cb = tf.DualCodebook(K, 32, 8, pix_weight=w)
    z_sem, z_pix = torch.randn(300, 32) * 3, torch.randn(300, 8) * 0.5  # unnormalised on purpose
    idx = cb.nearest(z_sem, z_pix) if rows is None else tf.in_row_chunks(cb.nearest, rows, z_sem, z_pix)
    d = brute_force(cb, z_sem, z_pix)
    assert idx.shape == (300,) and idx.dtype == torch.long
    # ours attains the minimum distance; exact ties aside, it is the same index
    assert torch.allclose(d.gather(1, idx[:, None]).squeeze(1), d.min(1).values, atol=1e-5)
    assert (idx == d.argmin(1)).float().mean() >= 0.99


class MatmulRows(torch.overrides.TorchFunctionMode):
    """Within the block, records the rows of each `a @ b` (its left operand)."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.matmul:
            self.rows.append(len(args[0]))
        return func(*args, **(kwargs or {}))


def test_quantizer_searches_in_row_chunks_of_bounded_scores():
    """The codebook's forward runs nearest() on row chunks of at most 2**22 scores on a CPU (128 rows at
    K = 32,768) and 2**28 on a GPU (8192 rows), one row where a row alone has more; the same ids."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert (tf.score_rows(cpu, 32768), tf.score_rows(gpu, 32768), tf.score_rows(cpu, 2**23)) == (128, 8192, 1)
    cb = tf.DualCodebook(32768, 32, 8)
    z = torch.randn(300, 40)
    with MatmulRows() as seen:
        _, idx, _ = cb(z)
    assert seen.rows == [128, 128, 44]
    assert torch.equal(idx, cb.nearest(z[:, :32], z[:, 32:]))


def test_row_chunks_give_the_unchunked_result():
    """in_row_chunks(nearest) = nearest for chunk sizes that do and do not divide the rows."""
    torch.manual_seed(0)
    cb = tf.DualCodebook(4096, 32, 8, pix_weight=0.7)
    z_sem, z_pix = torch.randn(300, 32) * 3, torch.randn(300, 8)
    whole = cb.nearest(z_sem, z_pix)
    for rows in (1, 7, 128, 299, 300, 1000):
        assert torch.equal(tf.in_row_chunks(cb.nearest, rows, z_sem, z_pix), whole), rows


def test_pix_weight_changes_the_choice():
    torch.manual_seed(0)
    cb_a, cb_b = tf.DualCodebook(256, 32, 8, pix_weight=0.0), tf.DualCodebook(256, 32, 8, pix_weight=100.0)
    cb_b.load_state_dict(cb_a.state_dict())
    z_sem, z_pix = torch.randn(200, 32), torch.randn(200, 8)
    a, b = cb_a.nearest(z_sem, z_pix), cb_b.nearest(z_sem, z_pix)
    # w = 0 picks by semantics alone; w = 100 by pixels, but for near-ties the semantic term breaks
    assert torch.equal(a, (F.normalize(z_sem) @ F.normalize(cb_a.sem).T).argmax(1))
    assert (b == (F.normalize(z_pix) @ F.normalize(cb_a.pix).T).argmax(1)).float().mean() > 0.95
    assert (a != b).float().mean() > 0.9


def test_codebook_forward_straight_through_and_loss():
    torch.manual_seed(0)
    cb = tf.DualCodebook(128, 32, 8, beta=0.25)
    z = torch.randn(50, 40, requires_grad=True)
    q, idx, stats = cb(z)
    assert torch.allclose(q, cb.lookup(idx), atol=1e-6)  # forward value = the chosen unit codes
    zn = torch.cat([F.normalize(z[:, :32], dim=1), F.normalize(z[:, 32:], dim=1)], 1)
    assert torch.allclose(stats["vq"], 1.25 * F.mse_loss(cb.lookup(idx), zn), atol=1e-6)
    assert torch.allclose(stats["d_sem"], (cb.lookup(idx)[:, :32] - zn[:, :32]).pow(2).sum(1).mean(), atol=1e-5)
    # straight-through: d q / d z equals d zn / d z
    g = torch.randn_like(q)
    assert torch.allclose(torch.autograd.grad((q * g).sum(), z, retain_graph=True)[0],
                          torch.autograd.grad((zn * g).sum(), z, retain_graph=True)[0], atol=1e-6)
    # stop-gradients: the codebook gets only ||sg[z] - q||^2, the encoder only beta ||z - sg[q]||^2
    g_sem, g_z = torch.autograd.grad(stats["vq"], [cb.sem, z], retain_graph=True)
    want_sem = torch.autograd.grad(F.mse_loss(cb.lookup(idx), zn.detach()), cb.sem, retain_graph=True)[0]
    want_z = torch.autograd.grad(0.25 * F.mse_loss(zn, cb.lookup(idx).detach()), z)[0]
    assert torch.allclose(g_sem, want_sem, atol=1e-7) and torch.allclose(g_z, want_z, atol=1e-7)


def test_search_stays_fp32_under_autocast():
    torch.manual_seed(0)
    cb = tf.DualCodebook(4096, 32, 8)
    z_sem, z_pix = torch.randn(500, 32), torch.randn(500, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx_bf16 = cb.nearest(z_sem, z_pix)
    assert torch.equal(idx_bf16, cb.nearest(z_sem, z_pix))


def test_usage_perplexity_and_psnr_on_known_values():
    usage, ppl = tf.codebook_usage(torch.bincount(torch.arange(8).repeat(3), minlength=16))  # 8 of 16 codes, uniformly
    assert usage.item() == 0.5 and abs(ppl.item() - 8) < 1e-4
    x = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(metrics.psnr(x + 0.2, x), torch.full((2,), 20.0))  # [0,1] error 0.1 -> 20 dB


# ---------------------------------------------------------------------------------------------
# GPU paths, checked on the CPU: the same numbers as the PyTorch ops they replace


@pytest.mark.parametrize("s,n", [(1, 14), (2, 14), (3, 7), (6, 8), (13, 14), (4, 4), (5, 16)])
def test_matrix_upsample_is_bicubic_interpolate(s, n):
    """upsample_matmul's A x A^T (what upsample runs) = F.interpolate bicubic (align_corners False, no
    antialias), value and gradient, for a contiguous and a channels_last input (the quantizer's permuted rows)."""
    g = torch.Generator().manual_seed(s)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 5, s, s, generator=g).contiguous(memory_format=fmt).requires_grad_()
        dy = torch.randn(2, 5, n, n, generator=g)
        theirs = F.interpolate(x, size=(n, n), mode="bicubic", align_corners=False, antialias=False)
        for ours in (tf.upsample_matmul(x, n), tf.upsample(x, n)):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(*(torch.autograd.grad(y, x, dy)[0] for y in (ours, theirs)), atol=1e-5,
                                       rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_layout_keeping_group_norm_is_group_norm(dtype, tol):
    """ChannelsLastGroupNorm (what channels_last() puts in place of nn.GroupNorm) = F.group_norm in fp32 (as
    autocast runs it), value and the gradients of input, weight and bias, and keeps the input's dtype and
    memory layout."""
    torch.manual_seed(0)
    norm = tf.group_norm(64)
    assert type(norm) is torch.nn.GroupNorm  # the plain form
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    tf.channels_last(norm)
    assert type(norm) is tf.ChannelsLastGroupNorm
    x, dy = torch.randn(2, 64, 5, 6) * 3 + 1, torch.randn(2, 64, 5, 6)  # an offset mean: fp32 statistics matter
    for fmt in (torch.contiguous_format, torch.channels_last):
        x_ref, x_low = x.clone().requires_grad_(), x.to(dtype).contiguous(memory_format=fmt).requires_grad_()
        want = F.group_norm(x_ref, 32, norm.weight, norm.bias, norm.eps)
        got = norm(x_low)
        assert got.dtype == dtype and got.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
        for a, b in zip(torch.autograd.grad(got, [x_low, norm.weight, norm.bias], dy.to(dtype)),
                        torch.autograd.grad(want, [x_ref, norm.weight, norm.bias], dy)):
            torch.testing.assert_close(a.float(), b, atol=tol * b.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 5e-2)])
def test_channels_last_pixel_cnn_is_the_contiguous_one(dtype, tol):
    """The pixel encoder and decoder as train.py runs them on CUDA (tf.channels_last: weights and activations
    channels_last, ChannelsLastGroupNorm) = the plain contiguous path: outputs and gradients, in fp32 and
    under bf16 autocast; every activation stays channels_last (no layout round trip); the state_dict is
    the same."""
    torch.manual_seed(0)
    cfg = replace(TINY, pix_dim=8)
    enc, dec = tf.PixelEncoder(cfg), tf.PixelDecoder(cfg)
    x = images(2)

    def run(enc, dec):
        with metrics.autocast_ctx("cpu", dtype):
            z = enc(x)
            y = dec(z)
        grads = torch.autograd.grad(y.float().square().mean(), [*enc.parameters(), *dec.parameters()])
        return z, y, grads

    z, y, grads = run(enc, dec)
    enc_cl, dec_cl = (tf.channels_last(copy.deepcopy(m)) for m in (enc, dec))
    for m, m_cl in ((enc, enc_cl), (dec, dec_cl)):
        norms, kinds = sum(type(n) is torch.nn.GroupNorm for n in m.modules()), [type(n) for n in m_cl.modules()]
        assert norms > 0 and kinds.count(tf.ChannelsLastGroupNorm) == norms and torch.nn.GroupNorm not in kinds
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m_cl.state_dict().values()))
        assert list(m.state_dict()) == list(m_cl.state_dict())
    not_cl = []
    for name, m in [*enc_cl.named_modules(prefix="enc"), *dec_cl.named_modules(prefix="dec")]:
        m.register_forward_hook(lambda m, i, out, name=name: not_cl.append(name) if out.ndim == 4 and not
                                out.is_contiguous(memory_format=torch.channels_last) else None)
    z_cl, y_cl, grads_cl = run(enc_cl, dec_cl)
    assert not not_cl, not_cl
    g_max = max(g.abs().max().item() for g in grads)  # (a bias before a norm has a zero gradient, plus noise)
    for a, b, scale in [(z_cl, z, z.abs().max().item()), (y_cl, y, y.abs().max().item()),
                        *((a, b, g_max) for a, b in zip(grads_cl, grads))]:
        torch.testing.assert_close(a.float(), b.float(), atol=tol * scale, rtol=tol)


# ---------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tf.TokenFlow(TINY).eval()


def test_ids_shape_and_range(tiny):
    idx = tiny.encode(images(3))
    assert idx.shape == (3, sum(s * s for s in TINY.scales)) == (3, TINY.seq_len)
    assert idx.dtype == torch.long and idx.min() >= 0 and idx.max() < TINY.codebook_size


def test_encode_decode_matches_eval_forward(tiny):
    x = images(4)
    with torch.no_grad():
        x_rec, sem, _ = tiny(x)
    idx = tiny.encode(x)
    assert torch.allclose(tiny.decode(idx), x_rec.clamp(-1, 1), atol=1e-5)
    assert torch.allclose(tiny.semantic_features(idx), sem, atol=1e-5)
    assert sem.shape == (4, TINY.grid ** 2, TINY.teacher_dim)


def test_per_scale_ids_are_each_scales_nearest_code(tiny):
    """The ids of scale k are the nearest codes of the residual left after scales < k."""
    z = tiny.features(images(2))
    f_hat, idx_Bl, _ = tiny.quantize(z, TINY.scales)
    residual = z
    for s, idx in zip(TINY.scales, idx_Bl):
        r = F.interpolate(residual, size=(s, s), mode="area").permute(0, 2, 3, 1).reshape(-1, 40)
        assert torch.equal(idx.flatten(), tiny.codebook.nearest(r[:, :32], r[:, 32:]))
        q = tiny.codebook.lookup(idx).view(2, s, s, 40).permute(0, 3, 1, 2)
        residual = residual - tf.upsample(q, TINY.grid)


def test_gradients_reach_both_encoders_and_both_codebooks():
    torch.manual_seed(0)
    model = tf.TokenFlow(replace(TINY, scale_drop=0.0)).train()
    x = images(4)
    x_rec, sem, stats = model(x)
    (F.mse_loss(x_rec, x) + sem.pow(2).mean() + stats["vq"]).backward()
    for name in ["sem_enc.conv1.0.weight", "sem_enc_head.2.weight", "pix_enc.conv_in.weight",
                 "pix_enc.to_code.weight", "codebook.sem", "codebook.pix", "sem_dec_head.2.weight",
                 "pix_dec.conv_out.weight"]:
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_scale_drop_only_in_training():
    model = tf.TokenFlow(replace(TINY, scale_drop=1.0))
    model.eval()
    assert all(model.train_scales() == list(TINY.scales) for _ in range(20))
    model.train()
    for _ in range(20):
        scales = model.train_scales()
        assert len(scales) == len(TINY.scales) - 1 and scales[0] == TINY.scales[0]  # never the first
    never = tf.TokenFlow(replace(TINY, scale_drop=0.0)).train()
    assert all(never.train_scales() == list(TINY.scales) for _ in range(20))


def test_a_few_steps_on_one_batch_lower_the_loss():
    torch.manual_seed(0)
    model = tf.TokenFlow(replace(TINY, scale_drop=0.0)).train()
    target = torch.randn(4, TINY.grid ** 2, TINY.teacher_dim)
    x = images(4)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        x_rec, sem, stats = model(x)
        loss = F.mse_loss(x_rec, x) + (1 - F.cosine_similarity(sem, target, dim=-1)).mean() + stats["vq"]
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_wrong_token_count_is_refused(tiny):
    with pytest.raises(ValueError, match="expected \\(B, 21\\)"):
        tiny.decode(torch.zeros(2, 20, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Next-scale GPT

GPT_TINY = tf.GPTConfig(num_classes=3, width=32, depth=2, heads=2)


@pytest.fixture(scope="module")
def gpt(tiny):
    """A GPT whose AdaLN projections are random (a new one's are zero), so the invariants below
    cover the class conditioning of every block as well."""
    torch.manual_seed(1)
    gpt = tf.GPT(GPT_TINY, tiny).eval()
    for ada in [block.ada for block in gpt.blocks] + [gpt.head_ada]:
        torch.nn.init.normal_(ada[1].weight, std=0.1)
    return gpt


def test_a_new_adaln_block_is_a_plain_pre_norm_block():
    """AdaLN's projection starts at zero: the block ignores the condition and computes what a
    pre-norm block with the same weights does (VAR's blocks start as plain blocks as well)."""
    torch.manual_seed(0)
    ada, plain = tf.AdaLNBlock(32, 2), tf.Block(32, 2)
    plain.attn.load_state_dict(ada.attn.state_dict())
    plain.mlp.load_state_dict(ada.mlp.state_dict())
    x, cond = torch.randn(3, 5, 32), torch.randn(3, 32)
    with torch.no_grad():
        assert torch.allclose(ada(x, cond), plain(x), atol=1e-6)
        torch.nn.init.normal_(ada.ada[1].weight, std=0.1)
        assert not torch.allclose(ada(x, cond), plain(x), atol=1e-3)  # trained, the condition moves it


def test_adaln_block_computes_its_docstring_formula():
    """AdaLNBlock's docstring formula, computed by hand with random nonzero ada weights: branches gated by
    1 + gate (VAR and DiT gate by gate), the six vectors in VAR's order."""
    doc = " ".join(tf.AdaLNBlock.__doc__.split())
    assert "x = x + (1 + gate1) * attn(LN(x) * (1 + scale1) + shift1)" in doc
    assert "x = x + (1 + gate2) * mlp(LN(x) * (1 + scale2) + shift2)" in doc
    assert "gate1, gate2, scale1, scale2, shift1, shift2" in doc
    torch.manual_seed(0)
    block = tf.AdaLNBlock(32, 2)
    torch.nn.init.normal_(block.ada[1].weight, std=0.3)
    torch.nn.init.normal_(block.ada[1].bias, std=0.3)
    x, c = torch.randn(3, 5, 32), torch.randn(3, 32)
    LN = lambda h: F.layer_norm(h, (32,))  # no affine of its own
    with torch.no_grad():
        gate1, gate2, scale1, scale2, shift1, shift2 = block.ada[1](F.silu(c))[:, None].chunk(6, dim=-1)
        h = x + (1 + gate1) * block.attn(LN(x) * (1 + scale1) + shift1)
        want = h + (1 + gate2) * block.mlp(LN(h) * (1 + scale2) + shift2)
        assert torch.allclose(block(x, c), want, atol=1e-5)
        h = x + gate1 * block.attn(LN(x) * (1 + scale1) + shift1)  # VAR's and DiT's gating: another block
        assert not torch.allclose(block(x, c), h + gate2 * block.mlp(LN(h) * (1 + scale2) + shift2), atol=1e-2)


def scale_bounds(cfg):
    """[(start, end)] of each scale's positions in the sequence."""
    ends = torch.tensor([s * s for s in cfg.scales]).cumsum(0).tolist()
    return list(zip([0] + ends[:-1], ends))


def test_greedy_cached_generation_equals_teacher_forced_argmax(gpt):
    labels = torch.tensor([0, 1, 2, 1])
    idx = gpt.generate(labels, cfg_scale=0, top_k=1)
    assert idx.shape == (4, TINY.seq_len) and idx.dtype == torch.long
    with torch.no_grad():
        logits = gpt(idx, labels)  # (B, L, K)
    assert logits.shape == (4, TINY.seq_len, TINY.codebook_size)
    assert torch.equal(logits.argmax(-1), idx)  # every position, every scale


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_guided_generation_uses_1_plus_t_cond_minus_t_uncond(gpt, schedule):
    labels, cfg_scale = torch.tensor([0, 2]), 2.5
    idx = gpt.generate(labels, cfg_scale=cfg_scale, cfg_schedule=schedule, top_k=1)
    with torch.no_grad():
        cond, uncond = gpt(idx, labels), gpt(idx, torch.full_like(labels, GPT_TINY.num_classes))
    S = len(TINY.scales)
    for si, (a, b) in enumerate(scale_bounds(TINY)):
        t = cfg_scale * si / (S - 1) if schedule == "linear" else cfg_scale
        guided = (1 + t) * cond[:, a:b] - t * uncond[:, a:b]
        assert torch.equal(guided.argmax(-1), idx[:, a:b]), si
    assert not torch.equal(cond.argmax(-1), uncond.argmax(-1))  # the label matters, so the check can fail


@pytest.mark.parametrize("k", [0, 1])
def test_scale_k_tokens_change_only_later_scales(gpt, k):
    torch.manual_seed(k)
    labels = torch.tensor([0, 1])
    idx = torch.randint(0, TINY.codebook_size, (2, TINY.seq_len))
    bounds = scale_bounds(TINY)
    changed = idx.clone()
    a, b = bounds[k]
    changed[:, a:b] = (changed[:, a:b] + 1 + torch.randint(0, 10, (2, b - a))) % TINY.codebook_size
    with torch.no_grad():
        before, after = gpt(idx, labels), gpt(changed, labels)
    assert torch.allclose(before[:, :b], after[:, :b], atol=1e-6)  # scales <= k: unchanged
    a1, b1 = bounds[k + 1]
    assert (before[:, a1:b1] - after[:, a1:b1]).abs().amax(-1).min() > 1e-4  # every token of scale k+1 moves


def test_gpt_inputs_are_the_tokenizers_cumulative_features():
    """Scale k reads the tokenizer's f_hat minus the codes of scales >= k, area-resized to s_k x s_k.
    Scale 3 of 1,2,3,4 resizes a non-constant 4x4 sum to 3x3, where area, bilinear and nearest differ."""
    cfg = replace(TINY, scales=(1, 2, 3, 4))
    torch.manual_seed(0)
    tiny = tf.TokenFlow(cfg).eval()
    gpt = tf.GPT(GPT_TINY, tiny).eval()
    idx = tiny.encode(images(2))
    seen = []
    hook = gpt.word_embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        gpt(idx, torch.tensor([0, 1]))
    hook.remove()
    assert len(seen) == len(cfg.scales) - 1  # one call per scale after the first: (B, s*s, C)
    bounds, n = scale_bounds(cfg), cfg.grid
    codes = [tiny.codebook.lookup(idx[:, a:b]).transpose(1, 2).unflatten(2, (s, s))
             for (a, b), s in zip(bounds, cfg.scales)]
    f_before = tiny.indices_to_features(idx)
    for k in range(len(cfg.scales) - 1, 0, -1):  # peel off the last scales one by one
        f_before = f_before - tf.upsample(codes[k], n)
        s = cfg.scales[k]
        expected = F.interpolate(f_before, size=(s, s), mode="area").flatten(2).transpose(1, 2)
        assert torch.allclose(seen[k - 1], expected, atol=1e-5), k


def test_same_seed_gives_the_same_samples(gpt):
    labels = torch.tensor([0, 1, 2, 0])
    run = lambda seed, **kw: gpt.generate(labels, cfg_scale=1.5, top_k=20, top_p=0.9,
                                          generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    assert torch.equal(run(3, refine=[(5, 0.8)]), run(3, refine=[(5, 0.8)]))
    assert not torch.equal(run(3, refine=[(5, 0.8)]), run(3))  # refining changes the samples


def refined_scale_logits(gpt, idx, labels, k, first_k):
    """Uncached reference for multi-step sampling: scale k re-predicted with its first sample fed
    in, i.e. its input is the cumulative feature including first_k; earlier scales as in training."""
    scales, n = gpt.scales, gpt.grid
    cond = gpt.class_emb(labels)
    x, f_hat, start = [gpt.start_tokens(cond)], torch.zeros(len(idx), gpt.codes.shape[1], n, n), 0
    for si, s in enumerate(scales[:k]):
        f_hat = tf.add_scale(f_hat, gpt.scale_codes(idx[:, start:start + s * s], s))
        start += s * s
        if si + 1 < k:
            x.append(gpt.next_input(f_hat, scales[si + 1]))
    x.append(gpt.next_input(tf.add_scale(f_hat, gpt.scale_codes(first_k, scales[k])), scales[k]))
    x, end = gpt.embed(torch.cat(x, 1), 0), start + scales[k] ** 2
    return gpt.head(gpt.transformer(x, cond, mask=gpt.mask[:end, :end]))[:, start:end]


def test_refine_with_top_k_1_is_deterministic_and_matches_an_uncached_reference(gpt):
    labels = torch.tensor([0, 1, 2])
    idx = gpt.generate(labels, cfg_scale=0, top_k=1, refine=[(1, 0.0)], generator=torch.Generator().manual_seed(0))
    assert torch.equal(idx, gpt.generate(labels, cfg_scale=0, top_k=1, refine=[(1, 0.0)],
                                         generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        first = gpt(idx, labels).argmax(-1)  # the first pass of each scale sees the final earlier scales
        for k, (a, b) in list(enumerate(scale_bounds(TINY)))[1:]:
            refined = refined_scale_logits(gpt, idx, labels, k, first[:, a:b]).argmax(-1)
            assert torch.equal(refined, idx[:, a:b]), k
    assert not torch.equal(first, idx)  # refining changed something, so the check above can fail


def test_a_first_scale_above_1_gets_that_many_start_tokens():
    """Scales (2, 4, 8): the first scale's 2*2 tokens all read the class embedding, plus their own position
    and level embeddings (VAR's first_l start positions); with one start token forward and generate failed.
    Cached greedy generation = the teacher-forced argmax, with and without refine; future scales do not
    change past logits."""
    cfg = replace(TINY, image_size=32, scales=(2, 4, 8))
    torch.manual_seed(0)
    gpt = tf.GPT(GPT_TINY, tf.TokenFlow(cfg)).eval()
    for ada in [block.ada for block in gpt.blocks] + [gpt.head_ada]:
        torch.nn.init.normal_(ada[1].weight, std=0.1)
    labels = torch.tensor([0, 1, 2])
    idx = gpt.generate(labels, cfg_scale=0, top_k=1)
    assert idx.shape == (3, cfg.seq_len) == (3, 84) and idx.dtype == torch.long
    changed = idx.clone()
    changed[:, 4:20] = (changed[:, 4:20] + 1) % cfg.codebook_size  # the 4x4 scale
    with torch.no_grad():
        logits, after = gpt(idx, labels), gpt(changed, labels)
    assert logits.shape == (3, 84, cfg.codebook_size)
    assert torch.equal(logits.argmax(-1), idx)  # every position, every scale
    assert not torch.allclose(logits[:, 0], logits[:, 1])  # the start positions differ by position
    assert torch.allclose(after[:, :20], logits[:, :20], atol=1e-6)  # scales <= 4x4: unchanged
    assert (after[:, 20:] - logits[:, 20:]).abs().amax(-1).min() > 1e-4  # every token of the 8x8 scale moves
    refined = gpt.generate(labels, cfg_scale=0, top_k=1, refine=[(1, 0.0)])
    with torch.no_grad():
        first = gpt(refined, labels).argmax(-1)
        for k, (a, b) in list(enumerate(scale_bounds(cfg)))[1:]:
            assert torch.equal(refined_scale_logits(gpt, refined, labels, k, first[:, a:b]).argmax(-1), refined[:, a:b])
    guided = gpt.generate(labels, cfg_scale=2.0, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert guided.shape == (3, 84)


def test_kv_cache_rerun_view_reads_without_appending():
    """Re-running the newest l tokens: they attend to the cache minus its last l entries plus their own
    keys and values, and the cache keeps the first run."""
    cache = tf.KVCache()
    k1, v1, k2, v2, k3, v3 = (torch.randn(2, 3, l, 4) for l in (5, 5, 2, 2, 2, 2))
    cache(k1, v1)
    assert all(torch.equal(a, torch.cat(b, 2)) for a, b in zip(cache(k2, v2), ([k1, k2], [v1, v2])))
    rerun = cache.rerun_view(2)(k3, v3)
    assert all(torch.equal(a, torch.cat(b, 2)) for a, b in zip(rerun, ([k1, k3], [v1, v3])))
    assert torch.equal(cache.k, torch.cat([k1, k2], 2)) and torch.equal(cache.v, torch.cat([v1, v2], 2))


def test_sample_logits_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    draw = lambda **kw: tf.sample_logits(logits, generator=g, **kw)
    assert set(draw(top_k=1).tolist()) == {0}
    assert set(draw(top_k=2).tolist()) == {0, 1}
    assert set(draw(top_p=0.5).tolist()) == {0}  # 0.5 alone reaches the mass
    assert set(draw(top_p=0.7).tolist()) == {0, 1}
    assert set(draw(top_k=3, top_p=0.85).tolist()) == {0, 1, 2}
    full = draw()
    assert set(full.tolist()) == {0, 1, 2, 3} and abs((full == 0).float().mean() - 0.5) < 0.03
    assert abs((draw(top_k=2) == 0).float().mean() - 0.5 / 0.8) < 0.03  # renormalised over the kept ids


def test_bad_labels_and_token_counts_are_refused(gpt):
    with pytest.raises(ValueError, match="class labels must be integers in \\[0, 3\\], with 3 the null class"):
        gpt.generate(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="class labels"):
        gpt.generate(torch.tensor([-1]))
    with pytest.raises(ValueError, match="expected \\(2, 21\\)"):
        gpt(torch.zeros(2, 20, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="token ids must lie in \\[0, 64\\)"):
        gpt(torch.full((2, 21), 64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="cfg_schedule"):
        gpt.generate(torch.tensor([0]), cfg_schedule="cosine")


def test_class_drop_only_in_training(gpt):
    idx, labels = torch.randint(0, 64, (64, TINY.seq_len)), torch.zeros(64, dtype=torch.long)
    with torch.no_grad():
        cond, null = gpt(idx, labels), gpt(idx, torch.full_like(labels, 3))
        gpt.train()
        torch.manual_seed(0)
        trained = gpt(idx, labels)
        gpt.eval()
    dropped = torch.isclose(trained[:, 0], null[:, 0], atol=1e-5).all(-1)
    kept = torch.isclose(trained[:, 0], cond[:, 0], atol=1e-5).all(-1)
    assert (dropped | kept).all() and 1 <= dropped.sum() <= 16  # p = 0.1 of 64
    assert torch.equal(gpt(idx, labels), cond)


def test_gpt_loss_goes_down_on_one_batch(tiny):
    torch.manual_seed(0)
    model = tf.GPT(replace(GPT_TINY, class_drop=0.0), tiny).train()
    idx, labels = torch.randint(0, 64, (8, TINY.seq_len)), torch.randint(0, 3, (8,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(idx, labels).flatten(0, 1), idx.flatten())
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_gpt_checkpoint_holds_only_gpt_weights_and_round_trips(tmp_path, tiny, gpt):
    path = str(tmp_path / "gpt.pt")
    save_checkpoint(path, "gpt", GPT_TINY, gpt, step=3, tokenizer_config=asdict(TINY))
    ckpt = load_checkpoint(path, "gpt")
    assert set(ckpt["model"]) == {name for name, _ in gpt.named_parameters()}  # no codebook, no buffers
    loaded, _ = load_model(path, "gpt", tiny)
    idx, labels = tiny.encode(images(2)), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx, labels), gpt(idx, labels))
    other = tf.TokenFlow(replace(TINY, codebook_size=128))
    with pytest.raises(ValueError, match="codebook_size 64 vs 128"):
        load_model(path, "gpt", other)
    with pytest.raises(ValueError, match="holds a 'gpt' checkpoint, expected 'tokenizer'"):
        load_model(path, "tokenizer")


# ---------------------------------------------------------------------------------------------
# The unified transformer: captions <-> ids (issue 27)

UNIFIED_TINY = replace(GPT_TINY, vocab_size=len(shapes.VOCAB), caption_len=shapes.CAPTION_LEN)


@pytest.fixture(scope="module")
def unified(tiny):
    """A UnifiedGPT with random AdaLN projections (a new one's are zero), so the task embedding matters."""
    torch.manual_seed(2)
    model = tf.UnifiedGPT(UNIFIED_TINY, tiny).eval()
    for ada in [block.ada for block in model.blocks] + [model.head_ada]:
        torch.nn.init.normal_(ada[1].weight, std=0.1)
    return model


def captions(n, seed=0):
    return ShapesDataset(n, 32, seed, "train").captions(range(n))


def test_captions_are_deterministic_per_seed_split_and_index_and_name_what_is_drawn():
    a = ShapesDataset(64, 32, 0, "train")
    words = a.captions(range(64))
    assert torch.equal(words[[9, 3]], ShapesDataset(64, 32, 0, "train").captions([9, 3]))  # any order, new object
    assert not torch.equal(words, ShapesDataset(64, 32, 0, "val").captions(range(64)))
    assert not torch.equal(words, ShapesDataset(64, 32, 1, "train").captions(range(64)))
    x, y = zip(*a.__getitems__(range(64)))
    assert torch.equal(words[:, 1] - shapes.VOCAB.index("disk"), torch.stack(y))  # the shape word is the class
    colours = foreground_colours(torch.stack(x))
    assert torch.equal(words[:, 0] - shapes.VOCAB.index("red"), colours)  # the colour word is what is drawn
    assert shapes.caption_text(words[0]) == f"{shapes.COLOURS[colours[0]]} {shapes.SHAPES[y[0]]}"


def test_held_out_pairs_cover_every_colour_and_every_shape_once():
    colours, shape_ids = zip(*shapes.HELD_OUT_PAIRS)
    assert sorted(colours) == sorted(shape_ids) == list(range(8))
    words = torch.stack([shapes.caption_ids(f"{shapes.COLOURS[c]} {shapes.SHAPES[s]}") for c in range(8) for s in range(8)])
    assert shapes.held_out_pair(words).sum() == 8 and shapes.held_out_pair(shapes.caption_ids("red star")[None]).item()


def test_text_prefix_is_causal_and_image_ids_never_reach_the_caption_positions(unified):
    words = captions(3)
    idx = torch.randint(0, TINY.codebook_size, (3, TINY.seq_len), generator=torch.Generator().manual_seed(0))
    W, bounds = UNIFIED_TINY.caption_len, scale_bounds(TINY)
    with torch.no_grad():
        hidden, (logits, _) = unified.t2i_hidden(idx, words), unified(idx, words)
        for k, (a, b) in enumerate(bounds[:-1]):
            changed = idx.clone()
            changed[:, a:b] = (changed[:, a:b] + 1) % TINY.codebook_size
            moved, (after, _) = unified.t2i_hidden(changed, words), unified(changed, words)
            assert torch.allclose(moved[:, :W], hidden[:, :W], atol=1e-6)  # the caption never sees the image
            assert torch.allclose(after[:, :b], logits[:, :b], atol=1e-6), k  # scales <= k: unchanged
            assert (after[:, b:] - logits[:, b:]).abs().amax() > 1e-4, k  # later scales move
        other = words.clone()
        other[:, 1] = (other[:, 1] - 9) % 8 + 10  # another shape word
        assert (unified(idx, other)[0] - logits).abs().amax() > 1e-4  # every scale reads the caption
        _, words_logits = unified(idx, words)
        _, other_logits = unified(idx, other)  # captioning: each word's logits see only the words before it
        assert torch.allclose(other_logits[:, :2], words_logits[:, :2], atol=1e-6)  # word 2 never predicts itself
        assert (other_logits[:, 2] - words_logits[:, 2]).abs().amax() > 1e-4


def test_cached_generation_and_captions_equal_the_uncached_argmax(unified):
    words = torch.cat([captions(3), torch.full((1, 2), tf.NULL_WORD)])  # and the null caption
    idx = unified.generate(words, cfg_scale=0, top_k=1)
    assert idx.shape == (4, TINY.seq_len)
    said = unified.caption(idx)
    with torch.no_grad():
        image_logits, _ = unified(idx, words)
        _, word_logits = unified(idx, said)
    assert torch.equal(image_logits.argmax(-1), idx)  # every position, every scale
    ended = (word_logits.argmax(-1) == tf.END_WORD).cumsum(1) > 0
    assert torch.equal(word_logits.argmax(-1)[:, :2].masked_fill(ended[:, :2], tf.NULL_WORD), said)
    for view in ("sem", "pix"):  # each view reads a half: it captions otherwise
        assert not torch.equal(unified.image_prefix(idx, [view] * 4), unified.image_prefix(idx, ["both"] * 4))


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_guidance_against_the_null_caption_follows_the_formula(unified, schedule):
    words, cfg_scale = captions(2), 2.5
    idx = unified.generate(words, cfg_scale=cfg_scale, cfg_schedule=schedule, top_k=1)
    with torch.no_grad():
        cond, uncond = unified(idx, words)[0], unified(idx, torch.full_like(words, tf.NULL_WORD))[0]
    S = len(TINY.scales)
    for si, (a, b) in enumerate(scale_bounds(TINY)):
        t = cfg_scale * si / (S - 1) if schedule == "linear" else cfg_scale
        assert torch.equal(((1 + t) * cond[:, a:b] - t * uncond[:, a:b]).argmax(-1), idx[:, a:b]), si
    assert not torch.equal(cond.argmax(-1), uncond.argmax(-1))  # the caption matters, so the check can fail


def test_caption_loss_counts_each_word_and_one_end():
    logits = torch.randn(2, 3, len(shapes.VOCAB))
    words = torch.tensor([[4, 12], [5, tf.NULL_WORD]])  # two words; one word then the filler
    targets = [(0, 0, 4), (0, 1, 12), (0, 2, tf.END_WORD), (1, 0, 5), (1, 1, tf.END_WORD)]
    want = sum(-logits[b, j].log_softmax(-1)[t] for b, j, t in targets) / len(targets)
    assert torch.allclose(tf.caption_loss(logits, words), want)


def test_unified_model_learns_one_batch(tiny):
    torch.manual_seed(0)
    model = tf.UnifiedGPT(UNIFIED_TINY, tiny)
    idx, words = torch.randint(0, TINY.codebook_size, (4, TINY.seq_len)), captions(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        image_logits, word_logits = model(idx, words)
        loss = tf.gpt_loss(image_logits, idx) + tf.caption_loss(word_logits, words)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("text,message", [
    ("red kite", "'kite' is not in the vocabulary; use red, green"), ("", "is not '<colour> <shape>'"),
    ("star", "is not '<colour> <shape>'"), ("star red", "is not '<colour> <shape>'"),
    ("red star bar", "is not '<colour> <shape>'; give a colour (red, green")])
def test_bad_prompts_name_the_problem(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        shapes.caption_ids(text)


# ---------------------------------------------------------------------------------------------
# Configs and presets


def test_tokenflow_b_preset_builds_with_official_sizes():
    cfg = tf.PRESETS["tokenflow-b"]["tokenizer"]
    assert cfg.seq_len == 561 and cfg.grid == 14
    model = tf.TokenFlow(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())
    # official pixel encoder / decoder, without the 1x1 convs to and from the 8-d codes
    assert count(model.pix_enc) - count(model.pix_enc.to_code) == 29_298_176
    assert count(model.pix_dec) - count(model.pix_dec.from_code) == 42_449_795
    assert abs(count(model.sem_dec) + count(model.sem_dec_head) - 22e6) < 0.05 * 22e6
    big = tf.enhanced_decoder(cfg)  # twice the base decoder's channels and res blocks: the official sizes
    assert (big.pix_dec_ch, big.pix_dec_res_blocks) == (256, 4) and config_diff(big, cfg) == [
        "pix_dec_ch = 256 vs 128", "pix_dec_res_blocks = 4 vs 2"]
    enhanced = tf.PixelDecoder(big)
    assert abs(count(enhanced) - count(enhanced.from_code) - 237_117_187) < 0.01 * 237_117_187
    toy = tf.enhanced_decoder(tf.PRESETS["toy"]["tokenizer"])  # the toy's own, doubled: not the 74.6M official one
    assert (toy.pix_dec_ch, toy.pix_dec_res_blocks) == (64, 2) and count(tf.PixelDecoder(toy)) < 4e6


def test_enhanced_decoder_docstring_states_what_is_built():
    """enhanced_decoder's docstring, checked against the tokenflow-b decoder built on the meta device: config
    count 4, 5 res blocks per level (PixelDecoder builds pix_dec_res_blocks + 1, as VQGAN), its parameters."""
    cfg = tf.enhanced_decoder(tf.PRESETS["tokenflow-b"]["tokenizer"])
    with torch.device("meta"):
        dec = tf.PixelDecoder(cfg)
    per_level = [0]
    for m in list(dec.layers)[3:]:  # after the middle ResBlock, AttnBlock, ResBlock: levels split by Upsample2x
        if isinstance(m, tf.Upsample2x):
            per_level.append(0)
        per_level[-1] += isinstance(m, tf.ResBlock)
    assert cfg.pix_dec_res_blocks == 4 and per_level == [5] * len(cfg.pix_ch_mult)
    doc = " ".join(tf.enhanced_decoder.__doc__.split())
    assert "pix_dec_res_blocks 4, so 5 res blocks per level" in doc
    assert f"({sum(p.numel() for p in dec.parameters()) / 1e6:.1f}M parameters)" in doc  # 237,119,491


@pytest.mark.parametrize("change,message", [
    (dict(patch_size=8), "token grids disagree"),
    (dict(pix_ch_mult=(1, 2)), "token grids disagree"),
    (dict(scales=(1, 2, 3)), "end at the token grid side 4"),
    (dict(scales=(2, 1, 4)), "increase strictly"),
    (dict(pix_ch=48), "multiples of 32"),
    (dict(vit_stem_ch=48), "conv stem"),
])
def test_inconsistent_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        replace(TINY, **change)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip(tmp_path, tiny):
    path = str(tmp_path / "tokenizer.pt")
    save_checkpoint(path, "tokenizer", TINY, tiny, step=7)
    loaded, ckpt = load_model(path, "tokenizer")
    loaded.eval()
    x = images(2)
    assert ckpt["step"] == 7 and loaded.cfg == TINY
    assert torch.equal(loaded.encode(x), tiny.encode(x))
    assert torch.equal(loaded.decode(tiny.encode(x)), tiny.decode(tiny.encode(x)))
    assert not os.path.exists(path + ".tmp")


def test_a_kill_mid_write_leaves_the_previous_checkpoint_whole(tmp_path, tiny, monkeypatch):
    path = str(tmp_path / "tokenizer.pt")
    save_checkpoint(path, "tokenizer", TINY, tiny, step=1)

    def killed_mid_write(obj, f):
        f.write(b"PK\x03\x04 half a zip")  # the first bytes of a torch.save archive, then the kill
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(utils.checkpoints.torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, "tokenizer", TINY, tiny, step=2)
    monkeypatch.undo()
    assert load_checkpoint(path, "tokenizer")["step"] == 1


def test_checkpoint_of_the_wrong_kind_is_refused(tmp_path, tiny):
    path = str(tmp_path / "tokenizer.pt")
    save_checkpoint(path, "tokenizer", TINY, tiny)
    with pytest.raises(ValueError, match="holds a 'tokenizer' checkpoint, expected 'teacher'"):
        load_model(path, "teacher")


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pt", "wb") as f:
        pickle.dump({"kind": "tokenizer", "payload": RunsCode()}, f)
    with pytest.raises(ValueError, match="not a checkpoint this code can read safely"):
        load_checkpoint("evil.pt", "tokenizer")
    assert not os.path.exists("pwned")


# ---------------------------------------------------------------------------------------------
# Data and the training script


def test_shapes_are_deterministic_and_splits_differ():
    a = ShapesDataset(100, 32, seed=0, split="train")
    b = ShapesDataset(100, 32, seed=0, split="train")
    v = ShapesDataset(100, 32, seed=0, split="val")
    xa, ya = a[17]
    xb, yb = b.__getitems__([3, 17])[1]
    assert torch.equal(xa, xb) and ya == yb  # same (seed, split, index) -> same image, alone or batched
    assert not torch.equal(xa, v[17][0])
    assert xa.shape == (3, 32, 32) and xa.min() >= -1 and xa.max() <= 1
    labels = a.params(range(100))["cls"]
    assert set(labels.long().tolist()) == set(range(ShapesDataset.num_classes))


def test_shape_class_is_geometry_not_colour():
    """Same colour, position, size and background; only the class differs -> different masks."""
    ds = ShapesDataset(1, 32)
    p = ds.params([0] * ShapesDataset.num_classes)
    p["cls"] = torch.arange(ShapesDataset.num_classes, dtype=torch.float32)
    x = ds.render(p)
    masks = (x - x[:1]).abs().sum(1) > 0.1  # where each image differs from the disk
    assert all(masks[i].sum() > 10 for i in range(1, len(x)))


def image_folder(root, classes=("cat", "ant", "bee"), per_class=3, seed=0):
    """root/<class>/<i>.png of random sizes, plus a text file that must be ignored."""
    g = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            h, w = g.integers(20, 60, 2)
            Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, c, f"{i}.png"))
    open(os.path.join(root, classes[0], "notes.txt"), "w").write("not an image")


def test_folder_dataset_classes_crops_and_cached_scan(tmp_path):
    image_folder(str(tmp_path / "data"))
    cache = str(tmp_path / "cache")
    ds = FolderDataset(str(tmp_path / "data"), 16, augment=False, cache_dir=cache)
    assert ds.classes == ["ant", "bee", "cat"] and len(ds) == 9 and ds.num_classes == 3
    assert [label for _, label in ds.files] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and y == 1 and x.min() >= -1 and x.max() <= 1
    assert torch.equal(ds[4][0], x)  # the centre crop is deterministic
    aug = FolderDataset(str(tmp_path / "data"), 16, augment=True, cache_dir=cache)
    torch.manual_seed(0)
    assert not all(torch.equal(aug[4][0], aug[4][0]) for _ in range(5))  # random crops and flips
    # the scan is cached, and redone when a class folder changes
    assert len(os.listdir(cache)) == 1
    time.sleep(0.02)  # past a tick of the file system's clock
    Image.new("RGB", (30, 30)).save(tmp_path / "data" / "bee" / "new.png")
    assert len(FolderDataset(str(tmp_path / "data"), 16, augment=False, cache_dir=cache)) == 10


def test_folder_without_classes_or_images_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        FolderDataset(str(tmp_path / "empty"), 16, False, str(tmp_path))
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "x.txt").write_text("text")
    with pytest.raises(ValueError, match="no image files"):
        FolderDataset(str(tmp_path / "noimg"), 16, False, str(tmp_path))
    with pytest.raises(SystemExit):
        train.get_args(["--dataset", "folder", "--data-path", str(tmp_path / "nowhere")])


def test_folder_dataset_trains_every_stage(tmp_path, capsys):
    """A 3-class image folder through teacher, tokenizer and GPT: class counts follow the training
    split, whose class list every checkpoint keeps; the held-out split lacks one class (issue 15)."""
    image_folder(str(tmp_path / "data" / "train"), per_class=4)
    image_folder(str(tmp_path / "data" / "val"), classes=("cat", "ant"), per_class=4, seed=1)  # no bee
    out = str(tmp_path / "out")
    train.main(["--dataset", "folder", "--data-path", str(tmp_path / "data"), "--iters", "1", "--out-dir", out,
                "--batch-size", "4"])
    assert f"data: {tmp_path / 'data'}: 12 training images in 3 classes, 8 held-out images" in capsys.readouterr().out
    teacher, _ = load_model(os.path.join(out, "teacher.pt"), "teacher")
    tokenizer, _ = load_model(os.path.join(out, "tokenizer.pt"), "tokenizer")
    gpt, _ = load_model(os.path.join(out, "gpt.pt"), "gpt", tokenizer)
    assert teacher.num_classes == gpt.cfg.num_classes == 3
    assert np.load(os.path.join(out, "tokens", "train_ids.npy")).shape == (12, tokenizer.cfg.seq_len)
    assert np.load(os.path.join(out, "tokens", "val_labels.npy")).tolist() == [0] * 4 + [2] * 4  # cat is 2, as in train
    for name in ("teacher.pt", "tokenizer.pt", "gpt.pt"):
        assert load_checkpoint(os.path.join(out, name))["classes"] == ["ant", "bee", "cat"], name
    png = sample.main(["--out-dir", out, "--classes", "cat", "0", "3", "--per-class", "1",
                       "--out", str(tmp_path / "s.png")])
    assert "3 classes x 1 images, one row per class (cat, ant, null)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="'dog' is not a class of .*; give a name \\(ant, bee, cat\\) or a number"):
        sample.main(["--out-dir", out, "--classes", "dog", "--out", png])


def test_folder_scan_follows_links_skips_hidden_names_and_sees_every_change(tmp_path):
    """Issue 15, fault 2: a linked folder is read (a link cycle ends), hidden files and folders at any
    depth are not, and the cached scan is redone when a file appears in any folder it read."""
    image_folder(str(tmp_path / "train"), classes=("a", "b"), per_class=2)
    image_folder(str(tmp_path / "elsewhere"), classes=("more",), per_class=6)
    (tmp_path / "train" / "a" / "more").symlink_to(tmp_path / "elsewhere" / "more")
    (tmp_path / "train" / "a" / "loop").symlink_to(tmp_path / "train")  # a cycle
    image_folder(str(tmp_path / "train" / "a" / ".ipynb_checkpoints"), classes=("x",), per_class=1)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "b" / ".hidden.png")
    (tmp_path / "train" / ".cache").mkdir()
    cache = str(tmp_path / "cache")
    ds = FolderDataset(str(tmp_path / "train"), 16, augment=False, cache_dir=cache)
    assert ds.classes == ["a", "b"]
    assert [f for f, _ in ds.files] == ["a/0.png", "a/1.png", "a/more/0.png", "a/more/1.png", "a/more/2.png",
                                        "a/more/3.png", "a/more/4.png", "a/more/5.png", "b/0.png", "b/1.png"]
    time.sleep(0.02)  # past a tick of the file system's clock, which stamps the folder's modification time
    Image.new("RGB", (4, 4)).save(tmp_path / "elsewhere" / "more" / "6.png")  # in a sub-folder, behind the link
    assert len(FolderDataset(str(tmp_path / "train"), 16, augment=False, cache_dir=cache)) == 11
    time.sleep(0.02)
    os.remove(tmp_path / "train" / "b" / "1.png")
    assert len(FolderDataset(str(tmp_path / "train"), 16, augment=False, cache_dir=cache)) == 10
    assert len(os.listdir(cache)) == 1  # one cache file, rewritten


def test_held_out_classes_map_onto_the_training_splits_by_name(tmp_path):
    """Issue 15, fault 1: a class folder missing from the held-out split shifts no label, and a held-out
    class the training split lacks stops with its name, in every script that reads the split."""
    image_folder(str(tmp_path / "train"), per_class=1)
    image_folder(str(tmp_path / "val"), classes=("cat", "ant"), per_class=1)
    val = data.make_dataset("folder", str(tmp_path), "val", 16, cache_dir=str(tmp_path))
    assert val.classes == ["ant", "bee", "cat"] and [label for _, label in val.files] == [0, 2]
    image_folder(str(tmp_path / "val"), classes=("dog",), per_class=1)
    with pytest.raises(ValueError, match="class folders the training split lacks: dog;"):
        data.make_dataset("folder", str(tmp_path), "val", 16, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="the val split has ant, bee, cat too; lacks disk, ring, triangle, square, "
                                         "plus, star, crescent, bar \\(its classes"):
        utils.cli.check_classes(["ant", "bee", "cat"], ShapesDataset.classes, "the val split", "fix")
    assert utils.cli.listing(range(1000)) == "0, 1, 2, 3, 4, 5, 6, 7, ... (1000 in all)"


def tiny_cifar_archive(path):
    """A CIFAR-10 python archive in the official layout, with 2 images per batch."""
    g = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        def add(name, obj):
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)]})
        for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
            add(name, {b"data": g.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [i % 10, 9]})


def load_prepare(dataset="cifar10"):
    spec = importlib.util.spec_from_file_location("prepare", os.path.join(HERE, "data", dataset, "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cifar10_prepare_writes_image_folders(tmp_path, monkeypatch):
    prepare, archive = load_prepare(), str(tmp_path / "cifar.tar.gz")
    tiny_cifar_archive(archive)
    monkeypatch.setattr(prepare, "MD5", prepare.md5(archive))
    monkeypatch.setattr(prepare.urllib.request, "urlretrieve", None)  # no network: a download would fail
    prepare.main(["--archive", archive, "--out", str(tmp_path)])
    ds = FolderDataset(str(tmp_path / "train"), 32, False, str(tmp_path))
    assert len(ds) == 10 and ds.classes == [f"class{i}" for i in range(10)]
    assert len(os.listdir(tmp_path / "test" / "class9")) == 1
    with tarfile.open(archive) as tar:  # pixels come through unchanged (row-major CHW -> HWC)
        batch = pickle.loads(tar.extractfile("cifar-10-batches-py/test_batch").read(), encoding="bytes")
    img = np.asarray(Image.open(tmp_path / "test" / "class5" / "00000.png"))
    assert np.array_equal(img, batch[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    monkeypatch.setattr(prepare, "MD5", "0" * 32)
    with pytest.raises(ValueError, match="expected 0000"):
        prepare.main(["--archive", archive, "--out", str(tmp_path)])


def test_cifar10_prepare_without_a_network_says_what_to_do(tmp_path, monkeypatch):
    prepare = load_prepare()
    monkeypatch.setattr(prepare.urllib.request, "urlretrieve", offline)
    with pytest.raises(FileNotFoundError, match="download from .* failed \\(no network\\); fetch the file on a "
                                                "machine with access and give it with --archive PATH"):
        prepare.main(["--archive", str(tmp_path / "cifar.tar.gz"), "--out", str(tmp_path)])


def test_cifar10_prepare_refuses_a_pickle_that_runs_code(tmp_path):
    prepare = load_prepare()
    with pytest.raises(pickle.UnpicklingError, match="not a genuine archive"):
        prepare.ArrayUnpickler(io.BytesIO(pickle.dumps(RunsCode()))).load()


def write_idx(path, array):
    """array (uint8) -> an IDX file in the official layout, gzipped if path ends in .gz."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.tobytes())


def tiny_fashion_mnist(root, n_train=40, n_test=20, gz=True):
    """The four Fashion-MNIST files with random 28x28 images, every class present -> the arrays."""
    os.makedirs(root, exist_ok=True)
    g, arrays = np.random.default_rng(0), {}
    for split, n in (("train", n_train), ("val", n_test)):
        images, labels = g.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)
        for name, array in zip(fashion_mnist.FILES[split], (images, labels)):
            write_idx(os.path.join(root, name + ".gz" * gz), array)
        arrays[split] = images, labels
    return arrays


def test_fashion_mnist_reads_idx_files_pads_to_32_and_keeps_labels(tmp_path):
    for gz in (True, False):
        root = str(tmp_path / f"gz{gz}")
        arrays = tiny_fashion_mnist(root, gz=gz)
        ds = data.make_dataset("fashion-mnist", root, "val", 32)
        assert len(ds) == 20 and ds.num_classes == 10 and ds.classes[9] == "Ankle boot"
        x, y = ds[13]
        assert x.shape == (3, 32, 32) and y == 3 and torch.equal(x[0], x[2])
        assert (x[:, :2] == -1).all() and (x[:, :, -2:] == -1).all()  # 2 black pixels a side
        assert torch.equal(x[0, 2:30, 2:30], torch.from_numpy(arrays["val"][0][13]).float() / 127.5 - 1)
    assert len(data.make_dataset("fashion-mnist", root, "train", 32)) == 40
    # the reader goes by the bytes, not the name: a gunzipped file still called .gz reads the same
    os.replace(os.path.join(root, "t10k-images-idx3-ubyte"), os.path.join(root, "t10k-images-idx3-ubyte.gz"))
    assert torch.equal(data.make_dataset("fashion-mnist", root, "val", 32)[13][0], x)
    with pytest.raises(ValueError, match="use --preset toy"):
        data.make_dataset("fashion-mnist", root, "val", 224)


def test_fashion_mnist_damaged_or_missing_files_are_refused(tmp_path, capsys):
    root = tmp_path / "fm"
    tiny_fashion_mnist(str(root), gz=False)
    path = root / "t10k-images-idx3-ubyte"
    good = path.read_bytes()
    for damage, message in [(good[:-5], "truncated"), (b"\x00\x00\x08\x01" + good[4:], "not an IDX file of 3-d"),
                            (b"PNG", "not an IDX file")]:
        path.write_bytes(damage)
        with pytest.raises(ValueError, match=message):
            data.make_dataset("fashion-mnist", str(root), "val", 32)
    path.write_bytes(good)
    write_idx(root / "t10k-labels-idx1-ubyte", np.zeros(19, np.uint8))  # one label short
    with pytest.raises(ValueError, match="labels; expected"):
        data.make_dataset("fashion-mnist", str(root), "val", 32)
    write_idx(root / "t10k-labels-idx1-ubyte", np.full(20, 10, np.uint8))  # a label beyond the 10 classes
    with pytest.raises(ValueError, match="label 10 is not one of the 10 classes"):
        data.make_dataset("fashion-mnist", str(root), "val", 32)
    tiny_fashion_mnist(str(root / "gz"))
    (root / "gz" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(good)[:-20])  # a cut download
    with pytest.raises(ValueError, match="not a readable IDX file"):
        data.make_dataset("fashion-mnist", str(root / "gz"), "val", 32)
    with pytest.raises(SystemExit) as e:
        train.get_args(["--dataset", "fashion-mnist", "--data-path", str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "run python data/fashion_mnist/prepare.py" in capsys.readouterr().err


def test_fashion_mnist_prepare_checks_md5_and_says_both_ways_to_get_the_files(tmp_path, monkeypatch):
    prepare, source, out = load_prepare("fashion_mnist"), str(tmp_path / "src"), str(tmp_path / "out")
    tiny_fashion_mnist(source)
    monkeypatch.setattr(prepare.urllib.request, "urlopen", None)  # no network: a download would fail
    with pytest.raises(ValueError, match="does not match the published MD5.*apt-get install --reinstall"):
        prepare.main(["--source", source, "--out", out])  # random images are not Fashion-MNIST
    assert not [f for f in os.listdir(out) if "ubyte" in f]  # nothing unchecked is left behind

    def content_md5(name):  # as Debian's recompressed files: only the content's MD5 matches
        return hashlib.md5(gzip.open(os.path.join(source, name + ".gz")).read()).hexdigest()

    monkeypatch.setattr(prepare, "MD5", {name: ("0" * 32, content_md5(name)) for name in prepare.MD5})
    write_idx(os.path.join(out, "t10k-labels-idx1-ubyte"), np.zeros(20, np.uint8))  # a stale other spelling
    prepare.main(["--source", source, "--out", out])
    assert sorted(os.listdir(out)) == sorted(n + ".gz" for n in prepare.MD5)  # the stale file is gone
    assert len(data.make_dataset("fashion-mnist", out, "train", 32)) == 40
    gz_sums = {name: (hashlib.md5(open(os.path.join(source, name + ".gz"), "rb").read()).hexdigest(), "0" * 32)
               for name in prepare.MD5}
    monkeypatch.setattr(prepare, "MD5", gz_sums)  # the official files: the .gz sums match
    prepare.main(["--source", source, "--out", str(tmp_path / "official")])
    assert len(os.listdir(tmp_path / "official")) == 4

    monkeypatch.setattr(prepare.urllib.request, "urlopen", lambda url, timeout: open(
        os.path.join(source, url.rsplit("/", 1)[1]), "rb"))  # a network that serves the files
    prepare.main(["--download", "--out", str(tmp_path / "downloaded")])
    assert len(os.listdir(tmp_path / "downloaded")) == 4
    monkeypatch.setattr(prepare.urllib.request, "urlopen", lambda url, timeout: open(
        os.path.join(source, "train-labels-idx1-ubyte.gz"), "rb"))  # every file served as the labels: wrong sums
    with pytest.raises(ValueError, match="does not match the published MD5 of train-images"):
        prepare.main(["--download", "--out", str(tmp_path / "dl")])
    assert os.listdir(tmp_path / "dl") == []  # the bad download is not kept

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(prepare.urllib.request, "urlopen", offline)
    monkeypatch.setattr(prepare, "DEBIAN", str(tmp_path / "no-debian-package"))  # so the default is to download
    with pytest.raises(ValueError, match="cannot download .*no network.*apt-get install .* --source DIR"):
        prepare.main(["--out", str(tmp_path / "other")])


def test_fashion_mnist_trains_every_stage_and_samples(tmp_path):
    tiny_fashion_mnist(str(tmp_path / "fm"))
    out = str(tmp_path / "out")
    train.main(["--dataset", "fashion-mnist", "--data-path", str(tmp_path / "fm"), "--iters", "2", "--out-dir", out,
                "--batch-size", "4", "--eval-images", "20"])
    tokenizer, _ = load_model(os.path.join(out, "tokenizer.pt"), "tokenizer")
    gpt, _ = load_model(os.path.join(out, "gpt.pt"), "gpt", tokenizer)
    assert gpt.cfg.num_classes == 10
    assert Image.open(os.path.join(out, "reconstructions.png")).size == (20 * 32 * 3, 2 * 32 * 3)  # 2 per class
    assert Image.open(sample.main(["--out-dir", out, "--per-class", "2"])).size == (2 * 32 * 3, 10 * 32 * 3)
    assert Image.open(sample.main(["reconstruct", "--out-dir", out])).size == (20 * 32 * 3, 2 * 32 * 3)
    rows = evaluate.main(["--out-dir", out, "--eval-images", "20", "--num-images", "10"])
    assert 0 <= rows[0]["teacher_acc"] <= 1 and 0 <= rows[0]["recon_acc"] <= 1 and rows[1]["images"] == 10
    probes = evaluate.main(["probe", "--out-dir", out, "--eval-images", "20", "--probe-images", "20"])
    assert all("class_acc" in r and "colour_acc" not in r for r in probes)  # grey: no colour target
    ids = sample.main(["encode", os.path.join(out, "reconstructions.png"), "--out-dir", out, "--out",
                       str(tmp_path / "ids.npy")])
    assert Image.open(sample.main(["decode", ids, "--out-dir", out, "--out", str(tmp_path / "d.png")])).size == (96, 96)


def test_foreground_colour_is_the_palette_colour_each_shape_was_drawn_with():
    d = ShapesDataset(512, split="val")
    p = d.params(range(512))
    assert torch.equal(foreground_colours(d.render(p)), p["colour"].long())  # every class, size and background
    grey = torch.full((2, 3, 32, 32), 0.1)
    grey[1, :, :2, :2] = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)  # 4 red pixels: a shape, just
    assert foreground_colours(grey).tolist() == [-1, 0]


def test_blobs_keep_each_images_colour_and_place_and_change_nothing_else():
    d = ShapesDataset(64, split="train")
    x = torch.stack([image for image, _ in d.__getitems__(range(8))])
    blobs = d.blobs(range(8))
    assert torch.equal(blobs, d.blobs(range(8)))  # deterministic
    assert torch.equal(foreground_colours(blobs), d.params(range(8))["colour"].long())
    assert torch.equal(x, torch.stack([image for image, _ in d.__getitems__(range(8))]))  # the classes' draws stay
    assert not torch.allclose(blobs, x, atol=0.1)  # another shape on the same background


def test_colour_coverage_counts_distinct_colours_per_class():
    labels = torch.tensor([0] * 8 + [1] * 8 + [2] * 3)
    colours = torch.tensor([3] * 8 + list(range(8)) + [5, -1, 5])  # one colour; all eight; one, and no shape
    assert colour_coverage(colours, labels) == (1 + 8 + 1) / 3


class BrightestChannel(torch.nn.Module):
    """A stand-in judge whose class is the brightest colour channel of the image."""

    def __init__(self):
        super().__init__()
        self.num_classes = 3

    def forward(self, x):
        return x.mean((2, 3))


class ChannelShift(torch.nn.Module):
    """A stand-in tokenizer whose 'reconstruction' rolls the channels of the images in the first half."""

    def encode(self, x):
        return x

    def decode(self, x):
        half = len(x) // 2
        return torch.cat([x[:half].roll(1, dims=1), x[half:]])


def test_judge_scores_images_and_reconstructions():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    x = -torch.ones(8, 3, 4, 4)
    x[torch.arange(8), labels] = 1.0  # class = the bright channel
    rows = metrics.evaluate_judge(BrightestChannel(), ChannelShift(), [(x[:4], labels[:4]), (x[4:], labels[4:])], "cpu")
    assert rows == {"acc": 1.0, "recon_class_acc": 0.5}  # each batch's first half is misread after the shift


def test_grids_keep_the_first_examples_of_each_class():
    kept = {}
    keep_class_examples(kept, torch.tensor([2, 2, 2, 0]), torch.arange(4), per_class=2)
    keep_class_examples(kept, torch.tensor([1, 0, 0, 3]), torch.arange(4, 8), per_class=2, max_classes=3)
    assert {c: [int(t[0]) for t in v] for c, v in kept.items()} == {2: [0, 1], 0: [3, 5], 1: [4]}
    assert class_rows(kept)[0].tolist() == [3, 5, 4, 0, 1]  # classes in order


# ---------------------------------------------------------------------------------------------
# LPIPS and the PatchGAN


def test_lpips_is_zero_on_identical_images_symmetric_and_positive():
    torch.manual_seed(0)
    lpips = utils.weights.LPIPS()
    for lin in lpips.lins:  # LPIPS v0.1 heads are non-negative
        lin.weight.data.abs_()
    x, y = images(3, 32), images(3, 32, seed=1)
    assert torch.equal(lpips(x, x), torch.zeros(3))
    assert torch.allclose(lpips(x, y), lpips(y, x)) and (lpips(x, y) > 0).all()
    assert (lpips(x, x + 0.3 * (y - x)) < lpips(x, y)).all()  # closer images, smaller distance


def test_load_lpips_reads_torchvision_vgg_and_lpips_heads(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ref = utils.weights.LPIPS()
    vgg = {f"features.{k}": v for k, v in ref.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision's file holds the classifier too
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    torch.save({f"lin{i}.model.1.weight": lin.weight.abs() for i, lin in enumerate(ref.lins)}, tmp_path / "vgg.pth")
    digest = lambda name, algo: hashlib.new(algo, open(tmp_path / name, "rb").read()).hexdigest()
    monkeypatch.setattr(utils.weights, "VGG16_SHA256", digest("vgg16-397923af.pth", "sha256")[:8])
    monkeypatch.setattr(utils.weights, "LPIPS_MD5", digest("vgg.pth", "md5"))
    monkeypatch.setattr(utils.weights.urllib.request, "urlretrieve", None)  # the files are there: no download
    lpips = utils.weights.load_lpips(str(tmp_path))
    assert torch.equal(lpips.features[28].weight, ref.features[28].weight)
    assert torch.equal(lpips.lins[4].weight, ref.lins[4].weight.abs())
    monkeypatch.setattr(utils.weights, "LPIPS_MD5", "0" * 32)
    with pytest.raises(ValueError, match="expected 0000"):
        utils.weights.load_lpips(str(tmp_path))

    def offline(url, path):
        raise utils.weights.urllib.error.URLError("no network")

    os.remove(tmp_path / "vgg.pth")  # missing, and no network to fetch it: say where to put it
    monkeypatch.setattr(utils.weights.urllib.request, "urlretrieve", offline)
    with pytest.raises(FileNotFoundError, match="vgg.pth is missing and its download .* failed"):
        utils.weights.load_lpips(str(tmp_path))


def test_hinge_loss_and_the_gan_step_in_the_tokenizer_stage(toy_run, tmp_path):
    assert tf.hinge_d_loss(torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0])).item() == 1.0
    out = str(tmp_path / "out")
    shutil.copytree(toy_run[0], out)
    argv = ["--stage", "tokenizer", "--out-dir", out, "--disc-start", "1", "--adaptive-disc-weight"]
    argv += ["--eval-images", "64"]
    train.main(argv + ["--iters", "3"])
    ckpt = load_checkpoint(os.path.join(out, "tokenizer.pt"), "tokenizer")
    assert ckpt["disc_optimizer"]["state"][0]["step"].item() == 2  # steps 1 and 2 of 0, 1, 2
    train.main(argv + ["--iters", "4", "--resume"])
    ckpt = load_checkpoint(os.path.join(out, "tokenizer.pt"), "tokenizer")
    assert ckpt["disc_optimizer"]["state"][0]["step"].item() == 3  # resumed, not restarted


@pytest.mark.parametrize("scaled", [False, True])
def test_one_discriminator_step_per_generator_step_through_its_scaler(toy_run, tmp_path, monkeypatch, scaled):
    """With --grad-accum 2 the PatchGAN steps once per generator step, not once per micro-batch, and
    its step goes through the generator's gradient scaler (under float16 its backward is scaled, and
    unscaled before the step, like the generator's). scaled: the scaler on, as float16 turns it on
    (float16 itself is too slow on a CPU for a test)."""
    out = str(tmp_path / "out")
    shutil.copytree(toy_run[0], out)
    is_disc = lambda opt: opt.param_groups[0]["betas"] == (0.5, 0.9)  # VQGAN's discriminator betas
    stepped, through_scaler = [], []
    adamw_step, scaler_init, scaler_step = torch.optim.AdamW.step, torch.amp.GradScaler.__init__, torch.amp.GradScaler.step

    def counted_step(opt, *a, **k):
        stepped.append("disc" if is_disc(opt) else "gen")
        return adamw_step(opt, *a, **k)

    def scaler_stepped(scaler, opt, *a, **k):
        through_scaler.append("disc" if is_disc(opt) else "gen")
        return scaler_step(scaler, opt, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted_step)
    monkeypatch.setattr(torch.amp.GradScaler, "step", scaler_stepped)
    if scaled:
        monkeypatch.setattr(torch.amp.GradScaler, "__init__", lambda self, device, enabled: scaler_init(self, device))
    train.main(["--stage", "tokenizer", "--out-dir", out, "--disc-start", "1", "--iters", "3", "--grad-accum", "2",
                "--eval-images", "16"])
    assert stepped.count("gen") == 3 and stepped.count("disc") == 2  # steps 1 and 2 of 0, 1, 2
    assert through_scaler.count("disc") == 2
    disc = tf.PatchDiscriminator()
    disc.load_state_dict(load_checkpoint(os.path.join(out, "tokenizer.pt"), "tokenizer")["disc"])
    assert all(p.isfinite().all() for p in disc.parameters())


@pytest.mark.parametrize("argv,message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--iters", "-1"], "--iters must be >= 0"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--teacher", "/no/such/teacher.pt"], "no such file"),
    (["--stage", "everything"], "invalid choice"),
    (["--preset", "tokenflow-b"], "has no toy teacher"),
    (["--stage", "teacher", "--teacher", __file__], "--stage teacher trains the toy teacher"),
    (["--batch-size", "10", "--grad-accum", "4"], "must divide by world size 1 x --grad-accum 4 = 4"),
    (["--grad-accum", "0"], "--grad-accum must be > 0"),
    (["--ema", "1"], "--ema must be in [0, 1)"),
    (["--finetune-decoder"], "add --stage tokenizer"),
    (["--codebook", "both"], "invalid choice"),
    (["--codebook-size", "0"], "--codebook-size must be > 0"),
])
def test_bad_flags_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.get_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_compile_without_a_toolchain_warns_and_trains_without_it(monkeypatch, capsys):
    """--compile where Inductor could not build kernels (no C++ compiler for the CPU, no Triton for CUDA):
    one warning line naming what to install, then a plain eager run rather than a traceback mid-run."""
    has_compiler = utils.cli.compile_toolchain_missing("cpu") is None
    assert train.get_args(["--compile", "--device", "cpu"]).compile == has_compiler
    monkeypatch.setattr(utils.cli.shutil, "which", lambda name: None)
    monkeypatch.setattr(utils.cli.importlib.util, "find_spec", lambda name: None)
    assert train.get_args(["--compile", "--device", "cpu"]).compile is False
    assert capsys.readouterr().out.strip().splitlines() == ["warning: --compile needs a C++ compiler (apt install g++, "
                                                            "or set CXX); training without torch.compile"]
    assert utils.cli.compile_toolchain_missing("cuda") == "Triton (pip install triton)"


def test_running_out_of_gpu_memory_is_one_line_naming_batch_size_and_grad_accum(capsys):
    message = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.81 GiB of which "
               "1.2 GiB is free. Of the allocated memory 130 GiB is allocated by PyTorch.\nSee documentation for ...")

    def main(argv):
        raise torch.cuda.OutOfMemoryError(message)

    with pytest.raises(SystemExit) as e:
        utils.cli.run_script(main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: CUDA out of memory. Tried to allocate 2.00 GiB; lower --batch-size, or (train.py) "
                          "raise --grad-accum")


@pytest.mark.parametrize("script,argv,message", [
    ("evaluate", ["eval", "--pool", "grid"], "--pool is for probe"),
    ("evaluate", ["probe", "--ref"], "use them with export"),
    ("evaluate", ["export", "--ref", "--recon"], "not allowed with argument"),
    ("evaluate", ["eval", "--num-images", "0"], "--num-images must be >= 1"),
    ("evaluate", ["eval", "--temperature", "0"], "--temperature must be > 0"),
    ("sample", ["generate", "--per-class", "0"], "--per-class must be >= 1"),
    ("sample", ["--refine", "100"], "--refine takes TOP_K,TOP_P pairs"),
    ("sample", ["--top-p", "1.5"], "--top-p must be in [0, 1]"),
    ("sample", ["decode"], "decode takes exactly one .npy file"),
])
def test_bad_sample_and_evaluate_flags_exit_2_with_a_message(script, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        {"sample": sample, "evaluate": evaluate}[script].get_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """Two steps of each stage through the real script (64 tokenized images for the GPT and the judge,
    4 judged samples per class)."""
    out = str(tmp_path_factory.mktemp("toy") / "out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "JUDGE", {"shapes": dict(images=256, width=8)})
        mp.setattr(train, "JUDGED_SAMPLES", 4)
        results = train.main(["--iters", "2", "--out-dir", out, "--eval-interval", "1", "--token-images", "64",
                              "--eval-images", "128"])  # a smaller held-out split keeps the test fast
    return out, results


def test_toy_run_smoke(toy_run):
    """Files appear and load back; the tokenizer starts from the teacher; the GPT stage logs its metrics."""
    out, results = toy_run
    assert set(results) == {"teacher", "tokenizer", "judge", "gpt"}
    for name in ["teacher.pt", "tokenizer.pt", "judge.pt", "gpt.pt", "metrics.jsonl", "reconstructions.png",
                 "gpt_samples.png"]:
        assert os.path.exists(os.path.join(out, name)), name
    teacher, _ = load_model(os.path.join(out, "teacher.pt"), "teacher")
    tokenizer, ckpt = load_model(os.path.join(out, "tokenizer.pt"), "tokenizer")
    assert ckpt["step"] == 2 and "optimizer" in ckpt
    # the tokenizer's semantic encoder starts as this teacher (then trains 2 small steps); a fresh
    # encoder from the same seed is far from it, so the check means something
    w = lambda vit: vit.blocks[0].attn.qkv.weight
    assert torch.allclose(w(tokenizer.sem_enc), w(teacher.vit), atol=0.01)
    torch.manual_seed(0)
    assert not torch.allclose(w(tf.TokenFlow(tokenizer.cfg).sem_enc), w(teacher.vit), atol=0.01)
    gpt, ckpt = load_model(os.path.join(out, "gpt.pt"), "gpt", tokenizer)
    assert ckpt["step"] == 2 and gpt.cfg.num_classes == ShapesDataset.num_classes
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    gpt_val = [r for r in rows if r["stage"] == "gpt" and r["split"] == "val"][-1]
    assert len(gpt_val["acc_per_scale"]) == len(tokenizer.cfg.scales) and 0 <= gpt_val["acc"] <= 1
    generated = rows[-1]  # the last row: the judge on the GPT's samples, at the default guidance and at 0
    assert generated["split"] == "generated" and generated["images"] == 4 * ShapesDataset.num_classes
    for k in ["recon_class_acc", "class_acc", "class_acc_cfg0", "teacher_class_acc", "sem_class_acc"]:
        assert 0 <= generated[k] <= 1, k
    per_class = generated["class_acc_per_class"]
    assert len(per_class) == ShapesDataset.num_classes and abs(sum(per_class) / 8 - generated["class_acc"]) < 1e-3
    assert 1 <= generated["colours"] <= 4 and 1 <= generated["colours_cfg0"] <= 4  # 4 samples per class
    judge, ckpt = load_model(os.path.join(out, "judge.pt"), "judge")
    assert ckpt["classes"] == ShapesDataset.classes and judge.num_classes == 8 and judge.none_class  # + blobs
    judge_val = [r for r in rows if r["stage"] == "judge"][-1]
    assert 0 <= judge_val["recon_class_acc"] <= 1 and 0 <= judge_val["acc"] <= 1


def test_token_file_matches_the_tokenizer_and_is_reused(toy_run):
    out, _ = toy_run
    tokenizer, _ = load_model(os.path.join(out, "tokenizer.pt"), "tokenizer")
    ids = np.load(os.path.join(out, "tokens", "train_ids.npy"))
    labels = np.load(os.path.join(out, "tokens", "train_labels.npy"))
    assert ids.dtype == np.uint16 and ids.shape == (64, tokenizer.cfg.seq_len) and labels.shape == (64,)
    x, y = zip(*ShapesDataset(64, 32, 0, "train").__getitems__(range(8)))
    assert np.array_equal(ids[:8], tokenizer.eval().encode(torch.stack(x)).numpy())
    assert np.array_equal(labels[:8], torch.stack(y).numpy())
    args = train.get_args(["--out-dir", out, "--token-images", "64"])
    stamp = os.path.getmtime(os.path.join(out, "tokens", "train_ids.npy"))
    data = train.token_file(args, tokenizer, "train")
    assert os.path.getmtime(os.path.join(out, "tokens", "train_ids.npy")) == stamp  # read, not rewritten
    assert np.array_equal(np.asarray(data.ids), ids)


def test_token_file_crash_mid_write_is_never_reused(toy_run, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    shutil.copytree(toy_run[0], out)
    tokenizer, _ = load_model(os.path.join(out, "tokenizer.pt"), "tokenizer")
    tokenizer.eval()

    def crash(x):
        raise KeyboardInterrupt("killed while writing the token file")

    with monkeypatch.context() as m:  # another image count: a rewrite that dies after it started
        m.setattr(tokenizer, "encode", crash)
        with pytest.raises(KeyboardInterrupt):
            train.token_file(train.get_args(["--out-dir", out, "--token-images", "32"]), tokenizer, "train")
    assert not os.path.exists(os.path.join(out, "tokens", "train_meta.json"))
    data = train.token_file(train.get_args(["--out-dir", out, "--token-images", "64"]), tokenizer, "train")
    assert len(data) == 64 and len(data.labels) == 64


def test_gpt_of_another_tokenizer_is_refused_on_resume_and_in_sample(toy_run, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(toy_run[0], out)
    path = os.path.join(out, "tokenizer.pt")
    ckpt = load_checkpoint(path, "tokenizer")
    ckpt["model"]["codebook.pix"] = torch.randn_like(ckpt["model"]["codebook.pix"])  # same sizes, other codes
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="trained on the ids of another tokenizer"):
        train.main(["--stage", "gpt", "--resume", "--iters", "2", "--out-dir", out, "--token-images", "64"])
    with pytest.raises(ValueError, match="trained on another tokenizer's ids"):
        sample.main(["--out-dir", out])


def test_sample_script_generates_reconstructs_and_round_trips_ids(toy_run, tmp_path):
    out, _ = toy_run
    grid = sample.main(["--out-dir", out, "--classes", "1", "2", "--per-class", "3", "--out", str(tmp_path / "g.png")])
    assert Image.open(grid).size == (3 * 32 * 3, 2 * 32 * 3)  # 3 per row, 2 rows, zoom 3
    again = sample.main(["--out-dir", out, "--classes", "1", "2", "--per-class", "3", "--out", str(tmp_path / "h.png")])
    assert np.array_equal(np.asarray(Image.open(grid)), np.asarray(Image.open(again)))  # same seed, same images
    x = (torch.rand(2, 32, 32, 3) * 255).byte().numpy()
    paths = [str(tmp_path / f"{i}.png") for i in range(2)]
    for arr, path in zip(x, paths):
        Image.fromarray(arr).save(path)
    ids_path = sample.main(["encode", *paths, "--out-dir", out, "--out", str(tmp_path / "ids.npy")])
    ids = np.load(ids_path)
    tokenizer, _ = load_model(os.path.join(out, "tokenizer.pt"), "tokenizer")
    expected = tokenizer.eval().encode(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert np.array_equal(ids, expected.numpy())
    decoded = sample.main(["decode", ids_path, "--out-dir", out, "--out", str(tmp_path / "d.png")])
    assert Image.open(decoded).size == (2 * 32 * 3, 32 * 3)
    sample.main(["reconstruct", *paths, "--out-dir", out, "--out", str(tmp_path / "r.png")])
    np.save(tmp_path / "short.npy", ids[:, :-1])
    r = subprocess.run([sys.executable, "sample.py", "decode", str(tmp_path / "short.npy"), "--out-dir", out],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode == 2 and "expected (B, 121)" in r.stderr
    with pytest.raises(ValueError, match="give a name \\(disk, ring, .*\\) or a number in \\[0, 8\\], with 8 the null"):
        sample.main(["--out-dir", out, "--classes", "9"])
    open(tmp_path / "bad.png", "wb").write(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        sample.main(["encode", str(tmp_path / "bad.png"), "--out-dir", out])


def test_resume_continues_from_the_checkpoint(tmp_path, capsys):
    out = str(tmp_path)
    train.main(["--stage", "teacher", "--iters", "2", "--out-dir", out])
    train.main(["--stage", "teacher", "--iters", "4", "--out-dir", out, "--resume"])
    assert "resumed from" in capsys.readouterr().out
    ckpt = load_checkpoint(os.path.join(out, "teacher.pt"), "teacher")
    assert ckpt["step"] == 4 and ckpt["optimizer"]["state"][0]["step"].item() == 4  # 2 + 2 Adam steps
    other = replace(tf.PRESETS["toy"]["tokenizer"], vit_depth=1)
    save_checkpoint(os.path.join(out, "teacher.pt"), "teacher", other, tf.Teacher(other, 8), num_classes=8)
    with pytest.raises(ValueError, match="vit_depth = 1 vs 4"):
        train.main(["--stage", "teacher", "--iters", "4", "--out-dir", out, "--resume"])


def test_mismatched_teacher_stops_with_both_values(tmp_path):
    path = str(tmp_path / "teacher.pt")
    other = replace(tf.PRESETS["toy"]["tokenizer"], vit_depth=1)
    save_checkpoint(path, "teacher", other, tf.Teacher(other, 8), num_classes=8)
    r = subprocess.run([sys.executable, "train.py", "--stage", "tokenizer", "--teacher", path, "--iters", "1",
                        "--out-dir", str(tmp_path)], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode == 2
    assert "vit_depth = 1 vs 4" in r.stderr


# ---------------------------------------------------------------------------------------------
# Distributed training, gradient accumulation, EMA, exact resume, the decoder finetune


def weights(path, kind):
    return load_checkpoint(path, kind)["model"]


def assert_same_weights(a, b, atol=0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol), k


@torch.no_grad()
def assert_same_function(path_a, path_b, kind, atol=1e-4):
    """Two trained models compute the same outputs. (Not the same weights: a bias just before a norm
    gets a zero gradient plus rounding noise, which Adam scales up to a full step of random sign.)"""
    a, b = (load_model(p, kind)[0].eval() for p in (path_a, path_b))
    x = images(4, size=a.cfg.image_size)
    if kind == "teacher":
        assert torch.allclose(a(x), b(x), atol=atol)
        return
    ids = torch.randint(0, a.cfg.codebook_size, (4, a.cfg.seq_len), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a.features(x), b.features(x), atol=atol)
    assert torch.allclose(a.decode(ids), b.decode(ids), atol=atol)
    assert torch.allclose(a.semantic_features(ids), b.semantic_features(ids), atol=atol)


def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
    """2 micro-batches of 4 give the step one batch of 8 gives (the teacher stage has no randomness)."""
    for accum in ("1", "2"):
        train.main(["--stage", "teacher", "--iters", "2", "--batch-size", "8", "--grad-accum", accum,
                    "--eval-images", "16", "--out-dir", str(tmp_path / accum)])
    assert_same_function(tmp_path / "1" / "teacher.pt", tmp_path / "2" / "teacher.pt", "teacher")


def test_resume_mid_run_continues_with_the_same_batches(tmp_path, monkeypatch):
    """Killed after the step-2 checkpoint of a 4-step run, then resumed: the same weights as a run
    that was never stopped (same data order, optimiser state and learning rate schedule)."""
    argv = ["--stage", "teacher", "--iters", "4", "--batch-size", "8", "--eval-interval", "2", "--eval-images", "16"]
    train.main(argv + ["--out-dir", str(tmp_path / "straight")])
    get_lr = train.get_lr

    def killed_at_step_3(step, *a):
        if step == 3:
            raise KeyboardInterrupt("killed")
        return get_lr(step, *a)

    with monkeypatch.context() as m:
        m.setattr(train, "get_lr", killed_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            train.main(argv + ["--out-dir", str(tmp_path / "resumed")])
    assert load_checkpoint(tmp_path / "resumed" / "teacher.pt", "teacher")["step"] == 2
    train.main(argv + ["--out-dir", str(tmp_path / "resumed"), "--resume"])
    assert_same_weights(weights(tmp_path / "straight" / "teacher.pt", "teacher"),
                        weights(tmp_path / "resumed" / "teacher.pt", "teacher"))


def test_ema_update_swap_and_what_evaluation_and_load_model_use(tmp_path):
    model = torch.nn.Linear(2, 1)
    ema = utils.train_state.EMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=100)  # min(0.5, 101/110) = 0.5
    assert torch.allclose(ema.weights["weight"], start + 0.5)
    run = utils.train_state.TrainState(model, None, None, ema, "cpu", path=None, save_fn=None)
    assert torch.allclose(run.evaluate(lambda: model.weight.detach().clone()), start + 0.5)  # evaluated with EMA
    assert torch.allclose(model.weight, start + 1.0)  # raw weights back after the evaluation
    ema.update(model, step=0)  # warm-up: decay min(0.5, 1/10) = 0.1
    assert torch.allclose(ema.weights["weight"], 0.1 * (start + 0.5) + 0.9 * (start + 1.0))
    # a run with EMA: evaluation, the checkpoint and load_model use the averaged weights
    out = str(tmp_path)
    row = train.main(["--stage", "teacher", "--iters", "3", "--ema", "0.9", "--eval-images", "64", "--out-dir", out])
    ckpt = load_checkpoint(os.path.join(out, "teacher.pt"), "teacher")
    assert not torch.equal(ckpt["ema"]["head.weight"], ckpt["model"]["head.weight"])
    teacher, _ = load_model(os.path.join(out, "teacher.pt"), "teacher")
    assert torch.equal(teacher.head.weight, ckpt["ema"]["head.weight"])
    val = data.make_dataset("shapes", None, "val", teacher.cfg.image_size, size=64)
    assert metrics.evaluate_teacher(teacher, data.eval_loader(val, 256), "cpu")["acc"] == row["teacher"]["acc"]


@pytest.mark.parametrize("decoder", ["same", "other"])
def test_finetune_decoder_trains_only_the_pixel_decoder(toy_run, tmp_path, monkeypatch, decoder):
    out = str(tmp_path / "out")
    shutil.copytree(toy_run[0], out)
    argv = ["--stage", "tokenizer", "--finetune-decoder", "--iters", "2", "--eval-images", "32", "--out-dir", out]
    if decoder == "other":  # a decoder of other sizes starts new (the enhanced one: the toy's, doubled)
        argv.append("--enhanced-decoder")
    train.main(argv)
    before, after = weights(os.path.join(out, "tokenizer.pt"), "tokenizer"), weights(os.path.join(out, "decoder.pt"), "tokenizer")
    frozen = [k for k in before if not k.startswith("pix_dec.")]
    assert_same_weights({k: before[k] for k in frozen}, {k: after[k] for k in frozen}, atol=0)
    assert any(after[k].shape != before[k].shape or not torch.equal(after[k], before[k])
               for k in before if k.startswith("pix_dec."))
    old, _ = load_model(os.path.join(out, "tokenizer.pt"), "tokenizer")
    new, _ = load_model(os.path.join(out, "decoder.pt"), "tokenizer")
    assert new.cfg.pix_dec_ch == (64 if decoder == "other" else 32)
    assert tokenizer_id(new) == tokenizer_id(old)  # same ids: token files and GPT stay valid
    x = images(4, size=32)
    assert torch.equal(new.eval().encode(x), old.eval().encode(x))
    load_model(os.path.join(out, "gpt.pt"), "gpt", new)
    png = sample.main(["--out-dir", out, "--tokenizer", os.path.join(out, "decoder.pt"), "--classes", "1",
                       "--per-class", "2", "--out", str(tmp_path / "s.png")])  # the GPT samples through it
    assert Image.open(png).size == (2 * 32 * 3, 32 * 3)


def test_torchrun_two_ranks_match_one_process(tmp_path):
    """torchrun --nproc_per_node=2 on CPU (Gloo) through all three stages: the teacher and tokenizer
    compute what those of a one-process run compute of the same global batch (the gradient average over ranks is
    the batch mean), the all-reduced held-out metrics equal the one-process ones, rank 0 alone
    writes; the GPT trains (its class drop draws per sample, so it is not compared)."""
    argv = ["train.py", "--iters", "2", "--batch-size", "8", "--eval-images", "32", "--token-images", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *argv, "--out-dir", str(tmp_path / "one")], cwd=HERE, env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *argv, "--out-dir", str(tmp_path / "two")], cwd=HERE, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    for name, kind in (("teacher.pt", "teacher"), ("tokenizer.pt", "tokenizer")):
        assert_same_function(tmp_path / "one" / name, tmp_path / "two" / name, kind)
    rows = [[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in ("one", "two")]
    assert [(r["stage"], r["split"]) for r in rows[0]] == [(r["stage"], r["split"]) for r in rows[1]]  # rank 0 only
    for a, b in zip(*rows):
        if a["stage"] in ("teacher", "tokenizer"):
            assert a["stage"] == "teacher" or {"ssim", "usage_per_scale"} <= a.keys()
            for k in ("acc", "psnr", "ssim", "sem_cos", "usage", "usage_per_scale", "recon_acc"):
                assert k not in a or a[k] == pytest.approx(b[k], abs=1e-3), k
    listing = [sorted(str(p.relative_to(tmp_path / run)) for p in (tmp_path / run).rglob("*")) for run in ("one", "two")]
    assert listing[0] == listing[1]  # the same files, no per-rank leftovers
    gpt = load_checkpoint(tmp_path / "two" / "gpt.pt", "gpt")
    assert gpt["step"] == 2 and gpt["optimizer"]["state"][0]["step"].item() == 2


def test_torchrun_gan_steps_once_per_step_with_grad_accum(toy_run, tmp_path):
    """Two ranks, --grad-accum 2, the PatchGAN from step 1 with the adaptive weight: the generator's
    and the discriminator's DDP modules share one backward per micro-batch, and the discriminator
    steps once per generator step (steps 1 and 2 of 0, 1, 2)."""
    out = str(tmp_path / "out")
    shutil.copytree(toy_run[0], out)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        "--stage", "tokenizer", "--disc-start", "1", "--iters", "3", "--grad-accum", "2",
                        "--adaptive-disc-weight", "--batch-size", "8", "--eval-images", "16", "--out-dir", out],
                       cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = load_checkpoint(os.path.join(out, "tokenizer.pt"), "tokenizer")
    assert ckpt["optimizer"]["state"][0]["step"].item() == 3 and ckpt["disc_optimizer"]["state"][0]["step"].item() == 2


def test_bench_estimate_counts_flops_and_saved_activations():
    """Linear(4, 3) on a (2, 4) input, squared and summed: forward 2*2*4*3 = 48 FLOPs and the weight
    gradient 48 more (the input needs none); saved for backward: the input (8 floats) and the
    output the square reads (6 floats) = 56 bytes, the weight not counted."""
    import bench
    lin, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    assert bench.measure(lambda: lin(x).pow(2).sum().backward(), list(lin.parameters())) == (96, 56)


def test_bench_estimate_steps_run_the_whole_recipe():
    """bench.py estimate's tokenizer step (train.py's tokenizer_loss with LPIPS and the PatchGAN) and GPT
    step, at the toy sizes: they run, and count FLOPs and saved activations for every trained part."""
    import bench
    cfg = tf.PRESETS["toy"]["tokenizer"]
    tok, gpt = bench.tokenizer_step(cfg), bench.gpt_step(cfg, tf.PRESETS["toy"]["gpt"])
    for row in (tok, gpt):
        assert row["flops_per_image"] > 0 and row["act_bytes_per_image"] > 0 and row["trained_params"] > 0
    assert tok["trained_params"] == sum(p.numel() for p in tf.TokenFlow(cfg).parameters()) + sum(
        p.numel() for p in tf.PatchDiscriminator().parameters())


def test_bench_profile_prints_the_top_ops_of_a_tokenizer_and_a_gpt_step(capsys):
    import bench
    bench.main(["profile", "--device", "cpu", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert out.count("profile: toy tokenizer, one training step at batch 2, float32, cpu") == 1
    assert "profile: toy gpt, one training step" in out and out.count("Self CPU time total") == 2
    assert "aten::convolution_backward" in out or "aten::mkldnn_convolution" in out  # the tokenizer's CNN shows


# ---------------------------------------------------------------------------------------------
# Reliability: odd and bad image files, signals, non-finite losses, exact resume after SIGKILL


def test_odd_images_are_converted_and_bad_files_skipped(tmp_path, capsys):
    root = tmp_path / "data" / "a"
    root.mkdir(parents=True)
    rgb = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8))  # 2 x 1: red | blue
    rgb.convert("L").save(root / "grey.png")
    rgb.convert("RGBA").save(root / "rgba.png")
    rgb.convert("P").save(root / "palette.png")
    rgb.convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(np.full((2, 2), 32768, dtype=np.uint16)).save(root / "deep.png")  # 16-bit mid-grey
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rgb.save(root / "rotated.jpg", exif=exif, quality=100)
    for name in ("grey.png", "rgba.png", "palette.png", "cmyk.jpg", "deep.png", "rotated.jpg"):
        assert read_rgb(root / name).mode == "RGB", name
    assert (np.asarray(read_rgb(root / "deep.png")) == 128).all()  # scaled, not clipped to 255
    assert read_rgb(root / "rotated.jpg").size == (1, 2)  # EXIF orientation applied
    transparent = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    transparent.save(root / "clear.png")
    assert np.asarray(read_rgb(root / "clear.png")).min() == 255  # transparency over white
    # bad files: zero bytes, truncated, not an image, unreadable
    (root / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    (root / "text.png").write_text("not an image")
    (root / "locked.png").symlink_to(tmp_path / "nowhere.png")  # a dangling link: reading it fails
    ds = FolderDataset(str(tmp_path / "data"), 8, augment=False, cache_dir=str(tmp_path))
    assert len(ds) == 11
    items = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 8, 8) and torch.isfinite(x).all() for x, _ in items)  # tiny images upscaled
    assert ds.unreadable.value == 4  # each bad file once, when its own index is read
    err = capsys.readouterr().err
    for name in ("empty.jpg", "truncated.jpg", "text.png", "locked.png"):
        assert f"skipping unreadable image {root / name}" in err, name
    # a training epoch over them reports the count at its end
    batches = device_batches(ds, 11, seed=0)
    next(batches)
    next(batches)  # the second epoch's first batch: the first epoch has ended
    assert "unreadable images skipped" in capsys.readouterr().out


def test_any_exception_from_one_file_costs_that_file_only(tmp_path, monkeypatch, capsys):
    """Issue 15, fault 3: Pillow has raised ZeroDivisionError and struct.error on phone JPEGs' EXIF.
    Orienting falls back to the stored image; any other exception from one file skips it with one
    warning line of its own (not glued to a progress bar), counted; sample.py's reader names it."""
    root = tmp_path / "data" / "a"
    root.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate to display
    Image.new("RGB", (2, 1)).save(root / "phone.jpg", exif=exif)
    for i in range(3):
        Image.new("RGB", (4, 4)).save(root / f"{i}.png")

    def broken_exif(*a, **kw):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(data.folders.ImageOps, "exif_transpose", broken_exif)
    assert read_rgb(root / "phone.jpg").size == (2, 1)  # as stored
    read = data.folders.read_rgb

    def struct_error_on_1(path):
        if str(path).endswith("1.png"):
            raise struct.error("unpack requires a buffer of 4 bytes")
        return read(path)

    monkeypatch.setattr(data.folders, "read_rgb", struct_error_on_1)
    ds = FolderDataset(str(tmp_path / "data"), 8, augment=False, cache_dir=str(tmp_path))
    capsys.readouterr()
    with tqdm.tqdm(total=len(ds), file=sys.stderr) as bar:  # a progress bar on stderr, as in training
        for i in range(len(ds)):
            assert ds[i][0].shape == (3, 8, 8)
            bar.update()
    assert ds.unreadable.value == 1
    lines = re.split("[\r\n]", capsys.readouterr().err)
    warning = f"warning: skipping unreadable image {root / '1.png'} (error: unpack"
    assert sum(line.startswith(warning) for line in lines) == 1
    with pytest.raises(ValueError, match="cannot read image .*1.png \\(error: unpack requires"):
        data.folders.load_images([str(root / "0.png"), str(root / "1.png")], 8)


def test_a_folder_of_only_bad_files_stops_with_a_message(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(3):
        (tmp_path / "a" / f"{i}.jpg").write_bytes(b"")
    ds = FolderDataset(str(tmp_path), 8, augment=False, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="3 image files in a row, from a/0.jpg, cannot be read"):
        ds[0]


TEACHER_RUN = ["--stage", "teacher", "--batch-size", "8", "--eval-images", "16"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_writes_a_checkpoint_and_resume_finishes_the_run(tmp_path, monkeypatch, capsys, signum):
    argv = TEACHER_RUN + ["--iters", "8", "--eval-interval", "100"]
    train.main(argv + ["--out-dir", str(tmp_path / "straight")])
    get_lr = train.get_lr

    def signal_at_step_5(step, *a):
        if step == 5:
            os.kill(os.getpid(), signum)  # arrives mid-step, as Ctrl-C or a scheduler's stop would
        return get_lr(step, *a)

    with monkeypatch.context() as m:
        m.setattr(train, "get_lr", signal_at_step_5)
        with pytest.raises(SystemExit) as e:
            train.main(argv + ["--out-dir", str(tmp_path / "stopped")])
    assert e.value.code == 128 + signum
    assert f"{signal.Signals(signum).name} at step 6: checkpoint written" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "stopped" / "teacher.pt", "teacher")["step"] == 6  # step 5 finished
    train.main(argv + ["--out-dir", str(tmp_path / "stopped"), "--resume"])
    assert_same_weights(weights(tmp_path / "straight" / "teacher.pt", "teacher"),
                        weights(tmp_path / "stopped" / "teacher.pt", "teacher"))


def test_non_finite_losses_skip_steps_then_stop_the_run(tmp_path, monkeypatch):
    cross_entropy, calls = F.cross_entropy, []

    def nan_at(bad_calls):
        def loss(*a, **kw):
            calls.append(1)
            return cross_entropy(*a, **kw) * (float("nan") if len(calls) in bad_calls else 1)
        return loss

    with monkeypatch.context() as m:  # steps 2 and 3 (calls 3 and 4) go bad: skipped, the run goes on
        m.setattr(train.F, "cross_entropy", nan_at({3, 4}))
        row = train.main(TEACHER_RUN + ["--iters", "6", "--out-dir", str(tmp_path / "a")])["teacher"]
    assert row["skipped_steps"] == 2
    assert load_checkpoint(tmp_path / "a" / "teacher.pt")["optimizer"]["state"][0]["step"].item() == 6 - 2
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "a" / "teacher.pt", "teacher").values())
    calls.clear()
    with monkeypatch.context() as m:  # from step 4 on every loss is NaN: 10 in a row stop the run
        m.setattr(train.F, "cross_entropy", nan_at(set(range(5, 100))))
        with pytest.raises(train.NonFiniteLoss, match=r"10 non-finite losses in a row \(steps 4-13\).*holds step 3"):
            train.main(TEACHER_RUN + ["--iters", "30", "--eval-interval", "3", "--out-dir", str(tmp_path / "b")])
    ckpt = load_checkpoint(tmp_path / "b" / "teacher.pt", "teacher")
    assert ckpt["step"] == 3 and all(torch.isfinite(w).all() for w in ckpt["model"].values())


HANG_AFTER_SAVE = """
import sys, time
sys.path.insert(0, {here!r})
import train
save = train.save_checkpoint
def save_then_hang(path, kind, config, model, step=0, **extra):
    save(path, kind, config, model, step, **extra)
    if step == {step}:
        print("saved", flush=True)
        time.sleep(600)  # the parent SIGKILLs us here
train.save_checkpoint = save_then_hang
train.main(sys.argv[1:])
"""


@pytest.mark.parametrize("stage", ["tokenizer", "gpt"])
def test_sigkill_then_resume_gives_the_weights_and_metrics_of_one_run(toy_run, tmp_path, stage):
    """6 steps straight vs 3 steps, SIGKILL, --resume, 3 steps: the same weights (1e-6) and the same
    metrics rows. Exact only if the data order, optimiser, EMA and random state all resume."""
    argv = ["--stage", stage, "--iters", "6", "--eval-interval", "3", "--batch-size", "8", "--ema", "0.5",
            "--eval-images", "128", "--token-images", "64"]
    for run in ("straight", "killed"):
        os.makedirs(tmp_path / run)
        for name in ["teacher.pt"] + (["tokenizer.pt", "tokens"] if stage == "gpt" else []):
            (shutil.copytree if name == "tokens" else shutil.copy)(os.path.join(toy_run[0], name), tmp_path / run / name)
    train.main(argv + ["--out-dir", str(tmp_path / "straight")])
    script = tmp_path / "hang.py"
    script.write_text(HANG_AFTER_SAVE.format(here=HERE, step=3))
    child = subprocess.Popen([sys.executable, str(script), *argv, "--out-dir", str(tmp_path / "killed")],
                             cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in child.stdout:  # the run's own lines, then ours once the step-3 checkpoint is written
        if line.strip() == "saved":
            break
    child.send_signal(signal.SIGKILL)
    child.wait()
    train.main(argv + ["--out-dir", str(tmp_path / "killed"), "--resume"])
    a, b = (weights(tmp_path / run / f"{stage}.pt", stage) for run in ("straight", "killed"))
    for k in a:
        assert (a[k].float() - b[k].float()).abs().max() <= 1e-6, k
    rows = [[{k: v for k, v in json.loads(line).items() if k != "train_s"} for line in open(tmp_path / run / "metrics.jsonl")]
            for run in ("straight", "killed")]
    assert rows[0] == rows[1] and len(rows[0]) >= 2


RANK_1_FAILS = """
import os, sys
sys.path.insert(0, {here!r})
import train
get_lr = train.get_lr
def fail_on_rank_1(step, *a):
    if step == 1 and os.environ["RANK"] == "1":
        raise RuntimeError("rank 1 fails")
    return get_lr(step, *a)
train.get_lr = fail_on_rank_1
train.main(sys.argv[1:])
"""


def test_when_one_rank_fails_every_rank_exits(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(RANK_1_FAILS.format(here=HERE))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                        *TEACHER_RUN, "--iters", "50", "--out-dir", str(tmp_path)], cwd=HERE, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and "rank 1 fails" in r.stderr
    assert time.time() - t0 < 60


def test_bench_estimate_counts_attention_by_hand():
    """The by-hand attention count (4 B N^2 D forward, x3 with backward) makes the total equal what
    FlopCounterMode counts when attention runs as plain matmuls (the math kernel)."""
    import bench
    attn, x = tf.Attention(8, 2), torch.randn(1, 5, 8)
    step = lambda: attn(x).sum().backward()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        reference, _ = bench.measure(step, list(attn.parameters()))
    assert bench.measure(step, list(attn.parameters()), trained_modules=[attn])[0] == reference
    assert bench.measure(step, list(attn.parameters()))[0] == reference - 3 * 4 * 5 * 5 * 8  # without: uncounted


@pytest.mark.parametrize("change,message", [
    (dict(image_size=18), "token grids disagree"),  # not divisible by the patch and CNN factors
    (dict(scales=[1, 2, 3]), "end at the token grid side 4"),
])
def test_a_checkpoint_with_an_impossible_config_exits_2(tmp_path, tiny, change, message):
    path = str(tmp_path / "tokenizer.pt")
    save_checkpoint(path, "tokenizer", TINY, tiny)
    ckpt = load_checkpoint(path)
    ckpt["config"].update(change)
    torch.save(ckpt, path)
    r = subprocess.run([sys.executable, "sample.py", "reconstruct", "--out-dir", str(tmp_path)], cwd=HERE,
                       capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_bench_naive_quantizer_gives_our_ids():
    """The official-style baseline of `bench.py vq` (distance matrices, one-hot) picks the same ids
    as TokenFlow.quantize, and its loss terms match, on a small config."""
    import bench
    from types import SimpleNamespace
    torch.manual_seed(0)
    codebook = tf.DualCodebook(TINY.codebook_size, TINY.sem_dim, TINY.pix_dim, pix_weight=0.7)
    z = torch.randn(3, TINY.sem_dim + TINY.pix_dim, TINY.grid, TINY.grid)
    f_ours, ids_ours, stats = tf.TokenFlow.quantize(SimpleNamespace(codebook=codebook, cfg=TINY), z, TINY.scales)
    window = torch.arange(10)  # ids seen before: usage counts the last 10 ids of window + this call's
    f_naive, ids_naive, vq, usage = bench.naive_quantize(codebook, z, TINY.scales, window)
    assert all(torch.equal(a, b) for a, b in zip(ids_ours, ids_naive))
    assert torch.allclose(f_ours, f_naive, atol=1e-5) and torch.allclose(stats["vq"], vq, atol=1e-6)
    last = torch.cat([window, *(i.flatten() for i in ids_ours)])[-10:]
    assert usage == last.unique().numel() / TINY.codebook_size


def test_bench_no_cache_sampler_gives_the_cached_samples(gpt):
    """Re-running the whole prefix at every scale (the official sampler) and our KV-cached
    generate draw the same ids from the same seed, with top-k and top-p on."""
    import bench
    labels = torch.tensor([0, 2, 3])  # 3: the null class
    for top_k, top_p in ((0, 0.0), (20, 0.8)):
        ours = gpt.generate(labels, cfg_scale=2.0, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(1))
        theirs = bench.generate_no_cache(gpt, labels, 2.0, top_k, top_p, torch.Generator().manual_seed(1))
        assert torch.equal(ours, theirs)


def test_a_second_signal_stops_at_once(tmp_path, monkeypatch):
    get_lr = train.get_lr

    def two_signals_at_step_2(step, *a):
        if step == 2:  # (raise_signal: to this thread, handled before it returns; os.kill may reach another
            # thread, and two pending SIGINTs then merge into one)
            signal.raise_signal(signal.SIGINT)  # remembered: a checkpoint after this step
            signal.raise_signal(signal.SIGINT)  # the impatient second Ctrl-C: Python's own KeyboardInterrupt
        return get_lr(step, *a)

    monkeypatch.setattr(train, "get_lr", two_signals_at_step_2)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran before
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(TEACHER_RUN + ["--iters", "6", "--out-dir", str(tmp_path)])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are back
    finally:
        signal.signal(signal.SIGINT, before)


# ---------------------------------------------------------------------------------------------
# Evaluation: metrics, probes, export, the codebook ablation


def test_psnr_and_ssim_of_identical_and_known_pairs():
    x = images(3, 16)
    assert torch.isinf(metrics.psnr(x, x)).all() and torch.allclose(metrics.ssim(x, x), torch.ones(3), atol=1e-5)
    # constant images 0.5 and 0.75 on [0, 1]: MSE 1/16 -> 10 log10(16) dB; SSIM's structure term is
    # C2 / C2 = 1, so SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1)
    a, b = torch.zeros(1, 3, 16, 16), torch.full((1, 3, 16, 16), 0.5)
    assert abs(metrics.psnr(a, b).item() - 10 * math.log10(16)) < 1e-4
    c1 = 0.01**2
    assert abs(metrics.ssim(a, b).item() - (2 * 0.5 * 0.75 + c1) / (0.5**2 + 0.75**2 + c1)) < 1e-6
    # an 11 x 11 image is one window: SSIM from Gaussian-weighted statistics computed here in float64
    x, y = torch.rand(1, 1, 11, 11, dtype=torch.float64), torch.rand(1, 1, 11, 11, dtype=torch.float64)
    g = torch.exp(-((torch.arange(11) - 5.0) / 1.5) ** 2 / 2).double()
    w = torch.outer(g, g) / g.sum() ** 2
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy, cxy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum(), (w * (x - mx) * (y - my)).sum()
    want = (2 * mx * my + c1) * (2 * cxy + 0.03**2) / ((mx**2 + my**2 + c1) * (vx + vy + 0.03**2))
    assert abs(metrics.ssim(x * 2 - 1, y * 2 - 1).item() - want.item()) < 1e-5
    # more noise, lower scores
    clean = images(2, 16)
    noisy = [(clean + s * torch.randn_like(clean)).clamp(-1, 1) for s in (0.05, 0.2, 0.5)]
    assert (metrics.ssim(noisy[0], clean) > metrics.ssim(noisy[1], clean)).all()
    assert (metrics.psnr(noisy[1], clean) > metrics.psnr(noisy[2], clean)).all()


def test_frechet_distance_zero_for_the_same_set_and_exact_for_shift_and_scale():
    a = torch.randn(500, 6, generator=torch.Generator().manual_seed(0)) @ torch.randn(6, 6) + 1.0
    assert abs(metrics.frechet_distance(a, a)) < 1e-6
    shift = torch.tensor([3.0, 0, -1, 0, 0, 2])
    assert abs(metrics.frechet_distance(a, a + shift) - 14.0) < 1e-6  # same covariance: |shift|^2
    # b = 2a: S_b = 4 S_a commutes with S_a, (S_a S_b)^1/2 = 2 S_a -> FD = |mu_a|^2 + tr S_a
    mu, cov = a.double().mean(0), torch.cov(a.double().T)
    assert abs(metrics.frechet_distance(a, 2 * a) - (mu.square().sum() + cov.trace()).item()) < 1e-6
    assert metrics.frechet_distance(a, a + 0.1) < metrics.frechet_distance(a, a + 1.0)


# ---------------------------------------------------------------------------------------------
# Pictures that teach the method: coarse to fine, and what each half of an id knows


@torch.no_grad()
def test_coarse_to_fine_ends_at_decode_and_column_k_reads_only_scales_up_to_k(tiny):
    ids = tiny.encode(images(3))
    columns = sample.coarse_to_fine(tiny, ids)  # (B, S, 3, H, W)
    assert columns.shape[:2] == (3, len(TINY.scales))
    assert torch.equal(columns[:, -1], tiny.decode(ids))  # the last column is the image itself
    starts = np.cumsum([0] + [s * s for s in TINY.scales])
    for k in range(len(TINY.scales) - 1):  # new ids for every scale after k
        other = ids.clone()
        other[:, starts[k + 1]:] = torch.randint(0, TINY.codebook_size, (3, len(ids[0]) - starts[k + 1]))
        changed = sample.coarse_to_fine(tiny, other)
        assert torch.equal(changed[:, :k + 1], columns[:, :k + 1])  # scales <= k: the same pictures
        assert not torch.equal(changed[:, -1], columns[:, -1])


def test_nearest_neighbours_exclude_the_query_and_precision_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    feats, labels, k = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g), 4
    found = metrics.nearest_neighbours(feats, k)
    assert found.shape == (12, k) and all(i not in found[i].tolist() for i in range(12))
    hits = 0  # brute force: every other row's cosine, sorted
    for i in range(12):
        cos = {j: (feats[i] @ feats[j] / (feats[i].norm() * feats[j].norm())).item() for j in range(12) if j != i}
        nearest = sorted(cos, key=cos.get, reverse=True)[:k]
        assert found[i].tolist() == nearest
        hits += sum(labels[j] == labels[i] for j in nearest)
    assert metrics.precision_at_k(found, labels) == pytest.approx(hits / (12 * k))


def test_scales_and_neighbours_pictures_on_the_toy_run(toy_run, tmp_path):
    out, _ = toy_run
    path = sample.main(["scales", "--out-dir", out, "--out", str(tmp_path / "s.png")])
    columns, rows = len(tf.PRESETS["toy"]["tokenizer"].scales) + 1, 4 + 8  # 4 held-out images, a sample per class
    assert Image.open(path).size == (columns * 96, 16 + rows * 96)
    row = evaluate.main(["neighbours", "--out-dir", out, "--eval-images", "64", "--k", "3",
                         "--out", str(tmp_path / "n.png")])
    assert row["stage"] == "neighbours" and row["k"] == 3
    assert all(0 <= row[f"nn_{t}_prec_{h}"] <= 1 for t in ("class", "colour") for h in ("sem", "pix"))
    assert Image.open(tmp_path / "n.png").size == ((1 + 2 * (1 + 3)) * 96, 16 + 8 * 96)  # 8 queries
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[-1] == row


@pytest.mark.parametrize("argv,message", [
    (["sample.py", "scales", "--out-dir", "EMPTY"], "python train.py --stage tokenizer --out-dir"),
    (["evaluate.py", "neighbours", "--out-dir", "EMPTY"], "python train.py --stage tokenizer --out-dir"),
    (["evaluate.py", "neighbours", "--out-dir", "TOY", "--eval-images", "8", "--k", "8"], "--k 8 needs more"),
    (["sample.py", "scales", "--out-dir", "TOY", "--out", "/no/such/folder/s.png"], "does not exist"),
    (["evaluate.py", "neighbours", "--out-dir", "TOY", "--out", "/no/such/folder/n.png"], "does not exist"),
    (["evaluate.py", "neighbours", "--out-dir", "TOY", "--out", "n.npz"], "name it with one of"),
])
def test_scales_and_neighbours_bad_input_exit_2_and_write_nothing(toy_run, tmp_path, argv, message):
    out = str(tmp_path / "toy")
    shutil.copytree(toy_run[0], out)
    (tmp_path / "empty").mkdir()
    before = sorted(os.listdir(out))
    argv = [{"EMPTY": str(tmp_path / "empty"), "TOY": out}.get(a, a) for a in argv]
    r = subprocess.run([sys.executable, *argv], cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr
    assert sorted(os.listdir(out)) == before and not os.listdir(tmp_path / "empty")


@pytest.fixture(scope="module")
def unified_run(toy_run, tmp_path_factory):
    """Three steps of --stage unified on the toy run's files (64 tokenized images), recording every
    caption the transformer trains on; text-to-image scored on 1 image per seen pair, 4 per held-out one."""
    out, seen = str(tmp_path_factory.mktemp("unified") / "out"), []
    shutil.copytree(toy_run[0], out)
    forward = tf.UnifiedGPT.forward

    def spy(self, idx, words):
        if self.training:
            seen.append(words.clone())
        return forward(self, idx, words)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tf.UnifiedGPT, "forward", spy)
        pair_prompts = metrics.pair_prompts
        mp.setattr(metrics, "pair_prompts", lambda: pair_prompts(1, 4))
        results = train.main(["--stage", "unified", "--iters", "3", "--out-dir", out, "--token-images", "64",
                              "--eval-images", "128", "--batch-size", "8"])
    return out, results, torch.cat(seen)


def test_held_out_pairs_never_reach_the_unified_training_batches(unified_run):
    out, results, seen = unified_run
    assert len(seen) == 3 * 8  # every training row went through the spy
    assert shapes.held_out_pair(captions(64)).sum() >= 4  # the token file holds held-out pairs: the filter has work
    assert not shapes.held_out_pair(seen).any()
    row = results["unified"]
    keys = [f"caption_{w}_acc{v}" for w in ("shape", "colour", "exact") for v in ("", "_sem", "_pix")] + \
        ["caption_exact_acc_heldout"] + [f"t2i_{w}_acc{v}" for w in ("shape", "colour", "joint") for v in ("", "_heldout")]
    assert row["stage"] == "unified" and all(0 <= row[k] <= 1 for k in keys) and row["cfg"] == metrics.DEFAULT_CFG_SCALE
    assert (row["t2i_images"], row["t2i_images_heldout"]) == (56, 32)
    assert row["caption_images"] + row["caption_images_heldout"] == 128
    assert json.loads(open(os.path.join(out, "metrics.jsonl")).readlines()[-1]) == row


def test_prompt_grid_captions_and_evaluate_row(unified_run, tmp_path, capsys):
    out = unified_run[0]
    sample.main(["--prompt", "red star", "blue ring", "green disk", "--per-class", "3", "--out-dir", out,
                 "--out", str(tmp_path / "p.png")])
    assert "red star (held out), blue ring, green disk" in capsys.readouterr().out
    assert Image.open(tmp_path / "p.png").size[1] == 3 * 96
    x, _ = zip(*ShapesDataset(3, 32, 0, "val").__getitems__(range(3)))
    files = []
    for i, image in enumerate(x):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(to_uint8(image[None])[0]).save(files[-1])
    sample.main(["caption", *files, "--out-dir", out, "--out", str(tmp_path / "c.png")])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.split()[-1].endswith(f"{i}.png") for i, line in enumerate(lines[:3]))
    assert all(set(line[:20].split()) <= set(shapes.VOCAB[2:]) for line in lines[:3])  # words of the vocabulary
    sample.main(["caption", "--out-dir", out, "--out", str(tmp_path / "h.png")])  # one of each unseen pair, 8 seen
    said = capsys.readouterr().out.splitlines()
    unseen = [line.split(": ")[1].split(" (")[0] for line in said if "(unseen pair)" in line]
    assert sorted(unseen) == sorted(f"{shapes.COLOURS[c]} {shapes.SHAPES[s]}" for c, s in shapes.HELD_OUT_PAIRS)
    rows = evaluate.main(["--out-dir", out, "--eval-images", "64", "--num-images", "8"])
    assert rows[-1]["stage"] == "unified" and 0 <= rows[-1]["t2i_joint_acc_heldout"] <= 1


@pytest.mark.parametrize("argv,message", [
    (["sample.py", "--prompt", "red kite", "--out-dir", "UNIFIED"], "'kite' is not in the vocabulary; use red, green"),
    (["sample.py", "--prompt", " ", "--out-dir", "UNIFIED"], "an empty prompt"),
    (["sample.py", "--prompt", "red star bar", "--out-dir", "UNIFIED"], "is not '<colour> <shape>'"),
    (["sample.py", "caption", "missing.png", "--out-dir", "UNIFIED"], "missing.png"),
    (["sample.py", "caption", "NOT_AN_IMAGE", "--out-dir", "UNIFIED"], "cannot read image"),
    (["sample.py", "--prompt", "red star", "--out-dir", "TOY"], "python train.py --stage unified --out-dir"),
    (["sample.py", "--prompt", "red star", "--out-dir", "FASHION"], "which has no captions"),
    (["train.py", "--stage", "unified", "--dataset", "fashion-mnist", "--out-dir", "TOY"], "only --dataset shapes has"),
])
def test_unified_bad_input_exits_2_with_one_line_and_writes_nothing(unified_run, toy_run, tmp_path, argv, message):
    dirs = {"UNIFIED": tmp_path / "unified", "TOY": tmp_path / "toy", "FASHION": tmp_path / "fashion"}
    shutil.copytree(unified_run[0], dirs["UNIFIED"])
    shutil.copytree(toy_run[0], dirs["TOY"])
    shutil.copytree(toy_run[0], dirs["FASHION"])
    ckpt = load_checkpoint(str(dirs["FASHION"] / "tokenizer.pt"))
    ckpt["args"]["dataset"] = "fashion-mnist"  # a run on data without captions
    torch.save(ckpt, dirs["FASHION"] / "tokenizer.pt")
    (tmp_path / "notes.txt").write_text("not an image")
    before = {k: sorted(os.listdir(d)) for k, d in dirs.items()}
    argv = [str(dirs[a]) if a in dirs else str(tmp_path / "notes.txt") if a == "NOT_AN_IMAGE" else a for a in argv]
    r = subprocess.run([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert {k: sorted(os.listdir(d)) for k, d in dirs.items()} == before


def test_linear_probe_beats_chance_on_separable_features_and_not_on_random_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 10, generator=g) * 3
    y_fit, y_val = torch.randint(5, (1000,), generator=g), torch.randint(5, (1000,), generator=g)
    x_fit = centres[y_fit] + torch.randn(1000, 10, generator=g)
    x_val = centres[y_val] + torch.randn(1000, 10, generator=g)
    assert metrics.linear_probe(x_fit, y_fit, x_val, y_val, 5) > 0.95
    shuffled = y_val[torch.randperm(1000, generator=g)]  # labels unrelated to the features
    assert abs(metrics.linear_probe(x_fit, y_fit, x_val, shuffled, 5) - 0.2) < 0.05
    random = torch.randint(10, (2000,), generator=g)  # random labels from the start: chance is 10%
    x = torch.randn(4000, 16, generator=g)
    assert abs(metrics.linear_probe(x[:2000], random, x[2000:], torch.randint(10, (2000,), generator=g), 10) - 0.1) < 0.03


@pytest.mark.parametrize("codebook", ["pixel", "semantic"])
def test_ablation_tokenizers_have_one_half_and_its_nearest_codes(codebook):
    """pixel: no semantic encoder or decoder; semantic: no pixel encoder, the pixel decoder reads the
    semantic codes but its loss does not train them (VQKD learns from the teacher alone). Either way
    the ids of every scale are the brute-force nearest codes of that one table."""
    cfg = replace(TINY, **train.CODEBOOKS[codebook])
    torch.manual_seed(0)
    model = tf.TokenFlow(cfg)
    x = images(2)
    x_rec, sem, stats = model(x)
    assert x_rec.shape == x.shape and model.features(x).shape[1] == cfg.sem_dim + cfg.pix_dim
    if codebook == "pixel":
        assert model.sem_enc is None and model.sem_dec is None and sem is None and stats["d_sem"] == 0
        with pytest.raises(ValueError, match="no semantic half"):
            model.semantic_features(model.encode(x))
    else:
        assert model.pix_enc is None and sem.shape == (2, cfg.grid**2, cfg.teacher_dim) and stats["d_pix"] == 0
        x_rec.square().mean().backward()
        assert model.sem_enc.blocks[0].attn.qkv.weight.grad is None and model.codebook.sem.grad is None
        assert model.pix_dec.conv_out.weight.grad.abs().sum() > 0
        sem.square().mean().backward()  # the semantic loss does train them
        assert model.sem_enc.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    table = F.normalize((model.codebook.pix if codebook == "pixel" else model.codebook.sem).double(), dim=1)
    residual = model.features(x).detach()
    for s, idx in zip(cfg.scales, model.encode(x).split([s * s for s in cfg.scales], dim=1)):
        r = F.normalize(F.interpolate(residual, size=(s, s), mode="area").permute(0, 2, 3, 1).flatten(0, 2), dim=1)
        assert torch.equal(idx.flatten(), torch.cdist(r.double(), table).argmin(1))
        q = model.codebook.lookup(idx).view(2, s, s, -1).permute(0, 3, 1, 2)
        residual = residual - tf.upsample(q, cfg.grid)


def test_eval_probe_and_export_on_the_toy_run(toy_run, tmp_path):
    out, _ = toy_run
    flags = ["--out-dir", out, "--eval-images", "64", "--num-images", "24", "--batch-size", "16"]
    before = len(open(os.path.join(out, "metrics.jsonl")).readlines())
    val, *generated = evaluate.main(["eval", *flags])
    assert val["split"] == "val" and np.isfinite(val["psnr"]) and 0 < val["ssim"] <= 1
    assert len(val["usage_per_scale"]) == len(val["perplexity_per_scale"]) == 5 and 0 < val["usage"] <= 1
    assert [g["cfg"] for g in generated] == [0.0, metrics.DEFAULT_CFG_SCALE]
    for g in generated:  # a GPT after 2 steps is far from the real images
        assert g["images"] == 24 and g["fd_teacher"] > g["fd_teacher_real"] > 0
        assert 0 <= g["class_acc"] <= 1 and 0 <= g["sem_class_acc"] <= 1
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")).readlines()[before:]]
    assert rows == json.loads(json.dumps([val, *generated]))  # one JSON line per metric set
    probes = evaluate.main(["probe", *flags, "--probe-images", "64"])
    assert [p["features"] for p in probes] == ["semantic", "pixel", "both", "teacher"]
    assert [p["dim"] for p in probes] == [32, 8, 40, 64]
    assert all(0 <= p["class_acc"] <= 1 and 0 <= p["colour_acc"] <= 1 for p in probes)
    npz = evaluate.main(["export", *flags, "--out", str(tmp_path / "samples.npz")])
    arr = np.load(npz)
    assert arr["arr_0"].shape == (24, 32, 32, 3) and arr["arr_0"].dtype == np.uint8
    assert np.bincount(arr["arr_1"]).tolist() == [3] * 8  # class-balanced
    ref = np.load(evaluate.main(["export", "--ref", *flags, "--out", str(tmp_path / "ref.npz")]))
    x, y = zip(*ShapesDataset(24, 32, 0, "val").__getitems__(range(24)))
    assert np.array_equal(ref["arr_0"], to_uint8(torch.stack(x))) and ref["arr_1"].tolist() == list(y)
    recon = np.load(evaluate.main(["export", "--recon", *flags, "--out", str(tmp_path / "recon.npz")]))
    tokenizer, _ = load_model(os.path.join(out, "tokenizer.pt"), "tokenizer")
    assert np.array_equal(recon["arr_0"], to_uint8(tokenizer.decode(tokenizer.encode(torch.stack(x)))))
    assert len(evaluate.main(["eval", *flags, "--cfg-scale", "0"])) == 2  # cfg 0 is evaluated once
    for split in ("train", "val"):
        image_folder(str(tmp_path / "d" / split))  # 9 images: fewer than asked for
    with pytest.raises(ValueError, match="held-out split has 9 images"):
        evaluate.main(["export", "--ref", "--dataset", "folder", "--data-path", str(tmp_path / "d"), *flags])


@pytest.mark.parametrize("codebook", ["pixel", "semantic"])
def test_one_half_tokenizers_train_and_evaluate_end_to_end(toy_run, tmp_path, codebook):
    """--codebook pixel / semantic through the tokenizer and GPT stages under another seed, then eval,
    probe and export --ref, which take the teacher, data and seed from the tokenizer's checkpoint."""
    out, _ = toy_run
    run, teacher = str(tmp_path / codebook), os.path.join(out, "teacher.pt")
    common = ["--codebook", codebook, "--teacher", teacher, "--out-dir", run, "--iters", "1", "--seed", "3",
              "--eval-images", "32", "--codebook-size", "256"]
    train.main(["--stage", "tokenizer", *common])
    assert load_model(os.path.join(run, "tokenizer.pt"), "tokenizer")[0].codebook.sem.shape[0] == 256
    train.main(["--stage", "gpt", *common, "--token-images", "64"])
    with pytest.raises(ValueError, match="--codebook"):  # the GPT stage without it names the flag
        train.main(["--stage", "gpt", "--teacher", teacher, "--out-dir", run, "--iters", "1"])
    last = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))][-1]
    assert ("sem_class_acc" in last) == (codebook == "semantic") and "teacher_class_acc" in last  # (no judge.pt)
    flags = ["--out-dir", run, "--eval-images", "32", "--num-images", "16", "--batch-size", "16"]
    val, *generated = evaluate.main(["eval", *flags])
    assert ("sem_cos" in val) == (codebook == "semantic") and len(generated) == 2
    assert all(("sem_class_acc" in g) == (codebook == "semantic") and "teacher_class_acc" in g
               and "class_acc" not in g for g in generated)  # no judge.pt in this run: only the teacher judges
    probes = evaluate.main(["probe", *flags, "--probe-images", "32"])
    assert [p["features"] for p in probes] == [codebook, "teacher"]
    ref = np.load(evaluate.main(["export", "--ref", *flags, "--out", str(tmp_path / "ref.npz")]))
    x, _ = zip(*ShapesDataset(16, 32, 3, "val").__getitems__(range(16)))  # seed 3's held-out split
    assert np.array_equal(ref["arr_0"], to_uint8(torch.stack(x)))


def test_results_table_has_a_row_per_tokenizer_and_dashes_for_missing_halves():
    spec = importlib.util.spec_from_file_location("results", os.path.join(HERE, "data", "shapes", "results.py"))
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    val = {"psnr": 23.0, "ssim": 0.65, "usage": 1.0, "perplexity": 270.0, "recon_acc": 0.5}
    gen = {"images": 8, "cfg": 0.0, "class_acc": 0.25, "colours": 7.5, "sem_class_acc": 0.5, "fd_judge": 2.0,
           "fd_judge_real": 0.1, "fd_teacher": 9.0, "fd_teacher_real": 0.3}
    probe = lambda kinds: [{"features": k, "class_acc": 0.5, "colour_acc": 0.25} for k in kinds]
    rows = {"dual": {"eval": [{**val, "sem_cos": 0.9}, gen], "mean": probe(results.PROBE_KINDS),
                     "grid": probe(results.PROBE_KINDS)},
            "pixel": {"eval": [val], "mean": probe(["pixel", "teacher"]), "grid": probe(["pixel", "teacher"])}}
    lines = results.table(rows, {"dual": {**val, "usage": 0.5}}).splitlines()
    assert lines[2].startswith("| dual | 23.00 | 0.650 | 100.0% | 270 | 0.900 | 50.0 | 50.0 / 50.0 / 50.0 / 50.0 |")
    assert lines[3].startswith("| pixel | 23.00 | 0.650 | 100.0% | 270 | – | 50.0 | – / 50.0 / – / 50.0 | "
                               "– / 25.0 / – / 25.0 |")
    assert lines[-5] == "| 8 samples | 0 | 25.0 | 7.50 | 50.0 | 2.00 (0.10) | 9.0 (0.30) |"
    assert lines[-1] == "| dual | 23.00 | 0.650 | 50.0% | 270 |"


# ---------------------------------------------------------------------------------------------
# Bad input from the field (issue 15): checkpoints of wrapped models, sampler numerics, and every
# flag of every script under hostile values


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])  # DDP, torch.compile, both
def test_state_dicts_of_wrapped_models_load(tmp_path, tiny, prefix):
    path = str(tmp_path / "tokenizer.pt")
    save_checkpoint(path, "tokenizer", TINY, tiny)
    ckpt = load_checkpoint(path)
    ckpt["model"] = {prefix + k: v for k, v in ckpt["model"].items()}
    torch.save(ckpt, path)
    loaded, _ = load_model(path, "tokenizer")
    assert torch.equal(loaded.eval().encode(images(2)), tiny.encode(images(2)))


def test_a_checkpoint_that_does_not_fit_or_is_missing_gets_one_line(tmp_path, tiny, capsys):
    """Issue 15, fault 4: missing, unexpected and misshapen tensors -> exit 2 with counts and the first
    names (not kilobytes of keys); a missing file -> the train.py command that writes it, --out-dir included."""
    path = str(tmp_path / "tokenizer.pt")
    save_checkpoint(path, "tokenizer", TINY, tiny)
    ckpt = load_checkpoint(path)
    names = list(ckpt["model"])
    for k in names[:5]:
        del ckpt["model"][k]
    ckpt["model"]["extra.weight"] = torch.zeros(1)
    ckpt["model"][names[6]] = torch.zeros(3, 2)
    torch.save(ckpt, path)
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as e:
        sample.cli(["reconstruct", str(tmp_path / "a.png"), "--tokenizer", path, "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and len(err) < 500
    assert f"does not fit a TokenFlow of its config: 5 missing ({', '.join(names[:3])}, ...); 1 unexpected " \
           f"(extra.weight); 1 misshapen ({names[6]} (3, 2) vs" in err
    out = str(tmp_path / "my run")
    for script, argv, command in [
            (sample, ["--tokenizer", os.path.join(out, "decoder.pt")],
             "--stage tokenizer --finetune-decoder --enhanced-decoder"),
            (sample, [], "--stage tokenizer"), (evaluate, [], "--stage tokenizer")]:
        with pytest.raises(SystemExit):
            script.cli(argv + ["--out-dir", out])
        assert f"train it first: python train.py {command} --out-dir '{out}'\n" in capsys.readouterr().err


def test_sampling_never_gives_nan(gpt):
    """Issue 15, fault 5: a temperature too small to divide by samples greedily, and guidance or
    temperatures of any finite size (or infinite logits) never make the sampler fail."""
    labels = torch.tensor([0, 1, 2])
    greedy = gpt.generate(labels, cfg_scale=0, top_k=1)
    for t in (1e-40, 1e-50, 0.0):
        assert torch.equal(gpt.generate(labels, cfg_scale=0, temperature=t), greedy), t
    g = torch.Generator().manual_seed(0)
    for cfg_scale, t in ((1e30, 1.0), (3e38, 1e30), (3e38, 1e-30)):
        idx = gpt.generate(labels, cfg_scale=cfg_scale, cfg_schedule="constant", temperature=t, top_p=0.9, generator=g)
        assert idx.min() >= 0 and idx.max() < TINY.codebook_size
    inf = float("inf")
    logits = torch.tensor([[inf, 0.0, -inf, inf], [-inf, -inf, -inf, -inf], [3e38, -3e38, 0.0, 1.0]])
    for t in (1.0, 1e-30, 1e30):
        assert tf.sample_logits(logits, temperature=t, generator=g).shape == (3,)
    for bad in (dict(temperature=float("nan")), dict(temperature=-1.0), dict(cfg_scale=float("nan")),
                dict(cfg_scale=float("inf"))):
        with pytest.raises(ValueError, match="cfg_scale must be a finite number and temperature"):
            gpt.generate(labels, **bad)


MISSING, FOLDER, TEXT, IMAGE, IDS, NPZ = "<missing>", "<folder>", "<text>", "<image>", "<ids>", "<npz>"  # paths
HOSTILE = {"number": ["nan", "inf", "-inf", "0", "-1", "1e30", ""], "string": ["", "nan", MISSING, FOLDER, TEXT],
           "choice": ["", "bogus"]}
MORE_HOSTILE = {"--temperature": ["1e-40"], "--cfg-scale": ["1e38"], "--top-p": ["1.5"], "--seed": [str(2**63)],
                "--classes": ["-1", "1e30", "bogus"], "--refine": ["nan,nan", "1e30,0.5", "-1,0.5", "5,inf", "x"],
                "inputs": [IMAGE, IDS, NPZ]}
PARSE_ONLY = {"--compile": "torch.compile takes minutes on a CPU"}  # its parse is checked, not a run
STAGE = {"--stage": "tokenizer"}
SCRIPTS = {  # base arguments that keep a run tiny, and per flag (positionals first, options after the base)
    "train": (["--stage", "teacher", "--iters", "1", "--batch-size", "2", "--eval-images", "2"], {
        **{f: ([], ["--stage", "tokenizer"]) for f in ("--teacher", "--lpips-weights", "--disc-start", "--codebook",
                                                        "--codebook-size", "--enhanced-decoder", "--finetune-decoder")},
        **{f: ([], ["--stage", "tokenizer", "--disc-start", "0"]) for f in ("--disc-weight", "--adaptive-disc-weight")},
        "--data-path": ([], ["--dataset", "folder"]), "--token-images": ([], ["--stage", "gpt"])}),
    "sample": (["--per-class", "1"], {"--data-path": (["reconstruct"], ["--dataset", "folder"]),
                                      "--dataset": (["reconstruct"], []),
                                      "inputs": [["reconstruct"], ["encode"], ["decode"]]}),
    "evaluate": (["--eval-images", "4", "--num-images", "4", "--probe-images", "4", "--batch-size", "4"], {
        "--data-path": ([], ["--dataset", "folder"]), "--pool": (["probe"], []), "--ref": (["export"], []),
        "--recon": (["export"], []), "--out": (["export"], [])}),
}


def hostile_cases(parser, base, context):
    """Every flag of a parser (read from it, so a new flag is covered at once) with each of its hostile
    values -> [(flag, argv)]. A flag whose kind has no hostile values fails the test."""
    cases = []
    for action in parser._actions:
        name = action.option_strings[0] if action.option_strings else action.dest
        if action.nargs == 0:  # a switch (--help included)
            values = [[]]
        else:
            kind = "choice" if action.choices else {int: "number", float: "number", None: "string"}.get(action.type)
            assert kind, f"{name}: no hostile values for type {action.type}; add them to the test"
            values = [[v] for v in HOSTILE[kind] + MORE_HOSTILE.get(name, [])]
        if not action.option_strings:  # a positional: after the positionals it needs, before the base
            cases += [(name, prefix + v + base) for prefix in context.get(name, [[]]) for v in values]
        else:
            prefix, options = context.get(name, ([], []))
            cases += [(name, prefix + base + options + ([f"{name}={v[0]}"] if v else [name])) for v in values]
    return cases


def tiny_out_dir(out):
    """tokenizer.pt, gpt.pt and a toy teacher.pt of tiny sizes in out, for shapes (8 classes) at 16 px."""
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    tokenizer, classes = tf.TokenFlow(TINY).eval(), ShapesDataset.classes
    save_checkpoint(os.path.join(out, "tokenizer.pt"), "tokenizer", TINY, tokenizer, classes=classes)
    gpt_cfg = replace(GPT_TINY, num_classes=8, depth=1)
    save_checkpoint(os.path.join(out, "gpt.pt"), "gpt", gpt_cfg, tf.GPT(gpt_cfg, tokenizer),
                       tokenizer_config=asdict(TINY), tokenizer_id=tokenizer_id(tokenizer), classes=classes)
    save_checkpoint(os.path.join(out, "teacher.pt"), "teacher", TINY, tf.Teacher(TINY, 8), num_classes=8,
                       classes=classes)


def offline(*args):
    raise OSError("no network")


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_no_flag_answers_hostile_values_with_a_traceback(name, tmp_path, monkeypatch, capsys):
    """The property behind issue 15: each script's command line (cli: parser, checks and main, in this
    process) over hostile values for every flag ends with exit code 0 or 2 and never a traceback; a
    float flag refuses NaN and infinities when the command line is parsed, naming the flag. Accepted
    values run main on tiny sizes (train: one step of the teacher, or of the tokenizer for its flags)."""
    script = {"train": train, "sample": sample, "evaluate": evaluate}[name]
    monkeypatch.chdir(tmp_path)  # relative paths (--out-dir nan) land here
    monkeypatch.setattr(utils.weights.urllib.request, "urlretrieve", offline)  # nothing downloads in tests
    out = str(tmp_path / "out")
    if name == "train":
        os.makedirs(out)
        toy = tf.PRESETS["toy"]["tokenizer"]
        save_checkpoint(os.path.join(out, "teacher.pt"), "teacher", toy, tf.Teacher(toy, 8), num_classes=8,
                           classes=ShapesDataset.classes)
    else:
        tiny_out_dir(out)
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("not what any flag wants")
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    np.save(tmp_path / "floats.npy", np.zeros((1, TINY.seq_len)))
    np.savez(tmp_path / "ids.npz", np.zeros((1, TINY.seq_len), np.int64))
    paths = {MISSING: str(tmp_path / "missing" / "x"), FOLDER: str(tmp_path / "folder"),
             TEXT: str(tmp_path / "notes.txt"), IMAGE: str(tmp_path / "a.png"), IDS: str(tmp_path / "floats.npy"),
             NPZ: str(tmp_path / "ids.npz")}
    base, context = SCRIPTS[name]
    failures, codes = [], {}
    for flag, argv in hostile_cases(script.parser(), base + ["--out-dir", out], context):
        for placeholder, path in paths.items():
            argv = [a.replace(placeholder, path) for a in argv]
        try:
            (script.get_args if flag in PARSE_ONLY else script.cli)(argv)
            code = 0
        except SystemExit as e:
            code = e.code or 0
        except Exception as e:  # what the user would have seen as a traceback
            code = f"{type(e).__name__}: {e}"
        err = capsys.readouterr().err
        codes[(flag, argv[-1].split("=")[-1])] = (code, err)
        if code not in (0, 2) or "Traceback" in err:
            failures.append(f"{' '.join(argv)} -> {code} {err[-300:]}")
    assert not failures, "\n".join(failures)
    floats = [a.option_strings[0] for a in script.parser()._actions if a.type is float]
    for flag in floats:
        for value in ("nan", "inf", "-inf"):
            code, err = codes[(flag, value)]
            assert code == 2 and f"{flag} must be" in err, (flag, value, err)
    assert {flag for flag, _ in codes} == {a.option_strings[0] if a.option_strings else a.dest
                                           for a in script.parser()._actions}  # every flag was exercised


def local_imports(path):
    """The repo's own modules a file imports (top-level names: tokenflow, data, utils, train, ...)."""
    import ast
    local = {"tokenflow", "data", "utils", "metrics", "train", "sample", "evaluate", "bench"}
    found = set()
    for node in ast.walk(ast.parse(open(os.path.join(HERE, path)).read())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        found |= {n.split(".")[0] for n in names} & local
    return found


def test_imports_go_one_way():
    """tokenflow.py <- data/ <- utils/ and metrics.py <- scripts: the model file imports nothing local,
    data/ at most the model file (its one experiment script, data/shapes/results.py, drives scripts),
    the plumbing and the metrics no script, and a script no other script but bench.py (train.py's steps)."""
    assert local_imports("tokenflow.py") == set()
    for name in os.listdir(os.path.join(HERE, "data")):
        if name.endswith(".py"):
            assert local_imports(os.path.join("data", name)) <= {"tokenflow", "data"}, name
    for name in os.listdir(os.path.join(HERE, "utils")):
        if name.endswith(".py"):
            assert local_imports(os.path.join("utils", name)) <= {"tokenflow", "data", "utils"}, name
    assert local_imports("metrics.py") <= {"tokenflow", "data", "utils"}
    for script in ("train.py", "sample.py", "evaluate.py"):
        assert local_imports(script) <= {"tokenflow", "data", "utils", "metrics"}, script
    assert local_imports("bench.py") <= {"tokenflow", "data", "utils", "metrics", "train"}
