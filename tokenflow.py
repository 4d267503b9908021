"""
TokenFlow, minimal: an image tokenizer whose one grid of indices serves both understanding (semantic
codes) and generation (pixel codes), and a GPT that generates those indices. All model code lives in
this file, in the order data flows through it; weights and checkpoints are read and written outside it.

Notable choices
- Two encoders: a ViT initialised from a teacher (CLIP for TokenFlow-B, a toy ViT trained on the toy
  data here) for semantics, and a VQGAN-style CNN for pixels. Both end on the same grid.
- Dual codebook, one shared index: two l2-normalised tables of the same size K, 32-d semantic and 8-d
  pixel. A code is chosen by argmin d_sem + w * d_pix, and both tables are looked up with that one
  index (TokenFlow, Sec. 3.2, "shared mapping").
- Multi-scale residual quantization as in VAR: the residual is quantized at growing scales 1x1 ... nxn,
  each scale's codes are upsampled and summed; a token sequence is all scales' indices, coarse to fine.
- Two decoders: a small ViT maps the semantic half back to teacher features (cosine loss), a VQGAN-style
  CNN maps the pixel half back to the image (L2; LPIPS and a PatchGAN, the Losses section's, join in
  the real-scale recipe).
- A GPT generates the shared ids scale by scale (VAR's next-scale prediction): all tokens of scale k at
  once from the cumulative codes of scales < k, under block-causal attention; sampling runs one forward
  per scale through a KV cache, with classifier-free guidance and TokenFlow's multi-step refinement.
- The paper's other half, at toy scale: one transformer (UnifiedGPT) reads the shared ids into a caption
  (f_hat through a projector, as a prefix) and writes them from a caption (next-scale prediction after
  the words), the task given by AdaLN.
- At toy scale a Judge, a small CNN trained on images and their reconstructions, says which class a
  generated image shows (train.py's judge stage; evaluate.py's class_acc).
- Each idea is written in its plain form where it is used; the faster equivalents the code runs
  sit in the last section, Speed variants, each tested equal to its plain form.

Shape letters: B batch, C channels (of a code: sem_dim + pix_dim), H W image side, n token grid
side, s side of one scale, l = s*s tokens of one scale, L = sum of s*s over scales, N rows fed to
the quantizer (in a ViT: its tokens), K codebook size, D transformer width, T teacher feature width.

References
1) TokenFlow, Qu et al. 2024: https://arxiv.org/abs/2412.03069 ; https://github.com/ByteFlow-AI/TokenFlow
2) VAR, Tian et al. 2024: https://arxiv.org/abs/2404.02905 ; https://github.com/FoundationVision/VAR
3) VQGAN, Esser et al. 2021: https://arxiv.org/abs/2012.09841 ; LlamaGen: https://github.com/FoundationVision/LlamaGen
4) ViT-VQGAN (l2-normalised low-dim codes), Yu et al. 2021: https://arxiv.org/abs/2110.04627
5) CLIP, Radford et al. 2021: https://arxiv.org/abs/2103.00020 (the ViT layout below follows it)
6) Classifier-free guidance, Ho & Salimans 2022: https://arxiv.org/abs/2207.12598 ;
   nucleus (top-p) sampling, Holtzman et al. 2019: https://arxiv.org/abs/1904.09751
7) DiT (adaLN), Peebles & Xie 2023: https://arxiv.org/abs/2212.09748
8) LLaVA (projector prefix), Liu et al. 2023: https://arxiv.org/abs/2304.08485 ; Show-o (one transformer,
   both directions), Xie et al. 2024: https://arxiv.org/abs/2408.12528
"""

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Building blocks: CNN parts (VQGAN / LlamaGen) and transformer parts (CLIP-style ViT)


def group_norm(ch):
    return nn.GroupNorm(32, ch, eps=1e-6)  # VQGAN's Normalize; on CUDA channels_last() swaps in a faster one


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map."""

    def __init__(self, ch):
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x_BChw):
        B, C, h, w = x_BChw.shape
        qkv = self.qkv(self.norm(x_BChw)).reshape(B, 3, C, h * w).transpose(-1, -2)  # (B, 3, hw, C)
        y = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # (B, hw, C)
        return x_BChw + self.proj(y.transpose(1, 2).reshape(B, C, h, w))


class Downsample2x(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as VQGAN: H -> H/2


class Upsample2x(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # H -> 2H


class Attention(nn.Module):
    """Multi-head self-attention with CLIP's fused in-projection; an optional boolean mask (True = may attend)
    and an optional cache (KVCache, beside the GPT): new keys and values in, all those to attend to out."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BND, mask=None, cache=None):
        B, N, D = x_BND.shape
        q, k, v = self.qkv(x_BND).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache(k, v)  # (B, heads, N_cached + N, D/heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, D/heads)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class QuickGELU(nn.Module):
    def forward(self, x):  # CLIP's GELU approximation; its weights were trained with it
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim, heads, quick_gelu=False):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), QuickGELU() if quick_gelu else nn.GELU(),
                                 nn.Linear(4 * dim, dim))

    def forward(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


def mlp_head(d_in, d_out):
    """Linear-Tanh-Linear, TokenFlow's task layer between a ViT and a code or teacher space."""
    return nn.Sequential(nn.Linear(d_in, d_in), nn.Tanh(), nn.Linear(d_in, d_out))


def init_weights(module):
    """ViT-style init for the transformer parts (the CNNs keep PyTorch's default)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# The tokenizer's config, then its pixel encoder and decoder (VQGAN / LlamaGen layout)


@dataclass
class TokenizerConfig:
    image_size: int = 224  # input side in pixels; images are square and in [-1, 1]
    # semantic encoder: a ViT with the teacher's shape, initialised from the teacher's weights
    patch_size: int = 16  # ViT patch; the token grid side is image_size // patch_size
    vit_width: int = 768  # D (ViT-B/16); the semantic decoder uses the same width
    vit_depth: int = 12  # transformer blocks of the teacher-shaped ViT
    vit_heads: int = 12  # attention heads, in every ViT here
    vit_stem_ch: int = 0  # 0: CLIP's single patch conv; > 0: a conv stem of that width (toy, see ViT)
    vit_quick_gelu: bool = False  # CLIP's QuickGELU in the MLPs (set for a CLIP teacher; False: GELU)
    teacher_dim: int = 512  # T: teacher feature width (CLIP ViT-B/16 `proj` output)
    sem_mean: tuple = (0.48145466, 0.4578275, 0.40821073)  # teacher input normalisation on
    sem_std: tuple = (0.26862954, 0.26130258, 0.27577711)  # [0, 1] pixels (CLIP's values)
    # pixel encoder / decoder: the VQGAN / LlamaGen CNN
    pix_ch: int = 128  # base channels; level i has pix_ch * pix_ch_mult[i] (multiple of 32: GroupNorm(32))
    pix_ch_mult: tuple = (1, 1, 2, 2, 4)  # one level per entry, 2x down between levels: 16x for 5
    pix_res_blocks: int = 2  # res blocks per encoder level
    z_channels: int = 256  # CNN width at the grid, before the 1x1 conv down to pix_dim
    pix_dec_ch: int = 128  # decoder base channels (the official "enhanced decoder": 256)
    pix_dec_res_blocks: int = 2  # decoder res blocks per level: this + 1, as VQGAN (enhanced: 4, so 5)
    # dual codebook with one shared index
    codebook_size: int = 32768  # K entries in each of the two tables
    sem_dim: int = 32  # semantic code width; 0: no semantic half (VQGAN-style, train.py --codebook pixel)
    pix_dim: int = 8  # pixel code width; 0: no pixel half (VQKD-style; the pixel decoder reads semantic codes)
    pix_weight: float = 1.0  # w in argmin d_sem + w * d_pix (paper: 1.0)
    beta: float = 0.25  # commitment weight in ||sg[z] - q||^2 + beta ||z - sg[q]||^2
    scales: tuple = (1, 2, 4, 6, 8, 10, 12, 14)  # residual VQ sides, coarse to fine; last = grid side
    scale_drop: float = 0.1  # P(drop one scale of index >= 1) per training forward (official)
    # semantic decoder: a ViT over the code grid (patch 1), then Linear-Tanh-Linear to T
    sem_dec_depth: int = 3  # blocks of the semantic decoder ViT (official: 3)

    def __post_init__(self):
        for f in fields(self):  # a config read back from a checkpoint has lists, not tuples
            if isinstance(getattr(self, f.name), list):
                setattr(self, f.name, tuple(getattr(self, f.name)))
        n_sem = self.image_size / self.patch_size
        n_pix = self.image_size / 2 ** (len(self.pix_ch_mult) - 1)
        if n_sem != n_pix or n_sem != int(n_sem):
            raise ValueError(f"token grids disagree: image_size {self.image_size} / patch_size {self.patch_size}"
                             f" = {n_sem:g} (semantic) but / 2^{len(self.pix_ch_mult) - 1} = {n_pix:g} (pixel, "
                             f"pix_ch_mult {self.pix_ch_mult}); pick sizes that give one whole grid side")
        if list(self.scales) != sorted(set(self.scales)) or self.scales[-1] != int(n_sem):
            raise ValueError(f"scales {self.scales} must increase strictly and end at the token grid side "
                             f"{int(n_sem)} (= image_size {self.image_size} / patch_size {self.patch_size})")
        if min(self.sem_dim, self.pix_dim) < 0 or not self.sem_dim + self.pix_dim:
            raise ValueError(f"sem_dim {self.sem_dim} and pix_dim {self.pix_dim} must be >= 0 and not both 0 "
                             "(0 leaves that half of the codes out)")
        if self.vit_stem_ch and (self.vit_stem_ch % 32 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"a conv stem (vit_stem_ch {self.vit_stem_ch}) needs a multiple of 32 channels "
                             f"and a power-of-two patch_size (got {self.patch_size}); or set vit_stem_ch = 0")
        if self.pix_ch % 32 or self.pix_dec_ch % 32 or self.vit_width % self.vit_heads:
            raise ValueError(f"pix_ch {self.pix_ch} and pix_dec_ch {self.pix_dec_ch} must be multiples of 32 "
                             f"(GroupNorm) and vit_width {self.vit_width} a multiple of vit_heads {self.vit_heads}")

    @property
    def grid(self):  # n: token grid side
        return self.image_size // self.patch_size

    @property
    def seq_len(self):  # L: tokens per image over all scales
        return sum(s * s for s in self.scales)


class PixelEncoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, pix_dim, n, n), n = H / 2^(levels - 1)."""

    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.pix_ch * m for m in cfg.pix_ch_mult]
        last = len(chs) - 1
        self.conv_in = nn.Conv2d(3, cfg.pix_ch, 3, padding=1)
        layers, c = [], cfg.pix_ch
        for i, c_out in enumerate(chs):  # 1. down path: res blocks, attention at the last level
            for _ in range(cfg.pix_res_blocks):
                layers += [ResBlock(c, c_out)] + ([AttnBlock(c_out)] if i == last else [])
                c = c_out
            layers += [Downsample2x(c)] if i != last else []
        layers += [ResBlock(c, c), AttnBlock(c), ResBlock(c, c)]  # 2. middle
        self.layers = nn.Sequential(*layers)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)
        self.to_code = nn.Conv2d(cfg.z_channels, cfg.pix_dim, 1)  # the official `quant_conv`

    def forward(self, x_B3HW):
        h = self.layers(self.conv_in(x_B3HW))
        return self.to_code(self.conv_out(F.silu(self.norm_out(h))))  # (B, pix_dim, n, n)


class PixelDecoder(nn.Module):
    """(B, pix_dim, n, n) -> (B, 3, H, W). Mirrors the encoder with one extra res block per level.
    Without a pixel half (pix_dim = 0) it reads the semantic codes (B, sem_dim, n, n) instead."""

    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.pix_dec_ch * m for m in cfg.pix_ch_mult][::-1]  # coarse to fine
        c = chs[0]
        self.from_code = nn.Conv2d(cfg.pix_dim or cfg.sem_dim, cfg.z_channels, 1)  # the official `post_quant_conv`
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        layers = [ResBlock(c, c), AttnBlock(c), ResBlock(c, c)]  # 1. middle
        for i, c_out in enumerate(chs):  # 2. up path: attention at the coarsest level
            for _ in range(cfg.pix_dec_res_blocks + 1):
                layers += [ResBlock(c, c_out)] + ([AttnBlock(c_out)] if i == 0 else [])
                c = c_out
            layers += [Upsample2x(c)] if i != len(chs) - 1 else []
        self.layers = nn.Sequential(*layers)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z_BCnn):
        h = self.layers(self.conv_in(self.from_code(z_BCnn)))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


# ---------------------------------------------------------------------------------------------
# ViT: one class for the teacher, the semantic encoder and the semantic decoder


def conv_stem(in_ch, patch_size, width, ch):
    """Stride-2 3x3 convs down to the patch grid, then 1x1 to the width: a ViT trained from scratch
    with this stem learns several times faster (Xiao et al. 2021, https://arxiv.org/abs/2106.14881)."""
    conv = lambda c_in, stride: [nn.Conv2d(c_in, ch, 3, stride, padding=1), group_norm(ch), nn.SiLU()]
    layers = conv(in_ch, 1)
    for _ in range(int(math.log2(patch_size))):  # halve, then one more conv: a wider receptive field
        layers += conv(ch, 2) + conv(ch, 1)
    return nn.Sequential(*layers, nn.Conv2d(ch, width, 1))


class ViT(nn.Module):
    """CLIP's vision layout: patch conv (no bias), class token, positions, ln_pre, blocks, ln_post.
    (B, in_ch, g*p, g*p) -> patch tokens (B, g*g, D); the class token is used inside, not returned.
    stem_ch > 0 swaps the patch conv for a conv stem (the toy teacher trains from scratch in a minute)."""

    def __init__(self, in_ch, patch_size, grid, width, depth, heads, stem_ch=0, quick_gelu=False):
        super().__init__()
        self.conv1 = (conv_stem(in_ch, patch_size, width, stem_ch) if stem_ch else
                      nn.Conv2d(in_ch, width, patch_size, stride=patch_size, bias=False))
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(Block(width, heads, quick_gelu) for _ in range(depth))
        self.ln_post = nn.LayerNorm(width)
        init_weights(self)

    def forward(self, x_BCHW):
        x = self.conv1(x_BCHW).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)  # (B, 1+N, D)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x[:, 1:])  # (B, N, D)


def teacher_input(x_B3HW, cfg):
    """[-1, 1] pixels -> the teacher's normalisation. The student sees exactly the same input
    (the official B code feeds its student raw [-1, 1] pixels; we do not copy that)."""
    mean = x_B3HW.new_tensor(cfg.sem_mean).view(1, 3, 1, 1)
    std = x_B3HW.new_tensor(cfg.sem_std).view(1, 3, 1, 1)
    return ((x_B3HW + 1) / 2 - mean) / std


class Teacher(nn.Module):
    """The semantic target: ViT patch tokens @ proj, CLIP's layout. The toy teacher adds a class
    head on the mean patch feature and is trained on labels; it stands in for CLIP here."""

    def __init__(self, cfg, num_classes=0):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        self.vit = ViT(3, cfg.patch_size, cfg.grid, cfg.vit_width, cfg.vit_depth, cfg.vit_heads, cfg.vit_stem_ch,
                       cfg.vit_quick_gelu)
        self.proj = nn.Linear(cfg.vit_width, cfg.teacher_dim, bias=False)
        self.head = nn.Linear(cfg.teacher_dim, num_classes) if num_classes else None
        init_weights(self)

    def features(self, x_B3HW):
        return self.proj(self.vit(teacher_input(x_B3HW, self.cfg)))  # (B, n*n, T)

    def forward(self, x_B3HW):
        return self.head(self.features(x_B3HW).mean(1))  # (B, num_classes) logits


# ---------------------------------------------------------------------------------------------
# Dual codebook: two l2-normalised tables, one shared index


class DualCodebook(nn.Module):
    """Two K-entry tables (K x sem_dim and K x pix_dim) addressed by one index.
    For unit vectors ||z - e||^2 = 2 - 2<z, e>, so argmin d_sem + w*d_pix is
    argmax <z_sem, e_sem> + w<z_pix, e_pix>: one matmul of [z_sem, w*z_pix] against [e_sem, e_pix]."""

    def __init__(self, codebook_size, sem_dim, pix_dim, pix_weight=1.0, beta=0.25):
        super().__init__()
        self.pix_weight, self.beta = pix_weight, beta
        self.sem = nn.Parameter(F.normalize(torch.randn(codebook_size, sem_dim), dim=1))  # (K, sem_dim)
        self.pix = nn.Parameter(F.normalize(torch.randn(codebook_size, pix_dim), dim=1))  # (K, pix_dim)

    def lookup(self, idx):
        """idx (...) long -> unit codes (..., sem_dim + pix_dim); only the rows used are normalised."""
        return torch.cat([F.normalize(self.sem[idx], dim=-1), F.normalize(self.pix[idx], dim=-1)], -1)

    @torch.no_grad()
    def nearest(self, z_sem, z_pix):
        """z_sem (N, sem_dim), z_pix (N, pix_dim), any norm -> idx (N,) long, argmin d_sem + w*d_pix of the unit
        vectors; fp32 scores (bf16 would move the argmin), all N x K at once (the quantizer chunks the rows)."""
        with torch.autocast(z_sem.device.type, enabled=False):
            z = torch.cat([F.normalize(z_sem.float(), dim=1), self.pix_weight * F.normalize(z_pix.float(), dim=1)], 1)
            e = torch.cat([F.normalize(self.sem.float(), dim=1), F.normalize(self.pix.float(), dim=1)], 1)  # (K, C)
            return (z @ e.T).argmax(1)  # (N,)

    def forward(self, z_NC):
        """z (N, sem_dim + pix_dim), not normalised -> q (N, C) straight-through, idx (N,), stats."""
        K, sem_dim = self.sem.shape
        z = torch.cat([F.normalize(z_NC[:, :sem_dim], dim=1), F.normalize(z_NC[:, sem_dim:], dim=1)], 1)
        idx = in_row_chunks(self.nearest, score_rows(z_NC.device, K), z_NC[:, :sem_dim], z_NC[:, sem_dim:])
        q = self.lookup(idx).to(z.dtype)  # (N, C)
        # codebook term pulls codes to the encoder, commitment term (x beta) the encoder to codes
        vq = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())  # VQ-VAE, eq. 3
        d = (q - z).detach().pow(2)  # the chosen codes' distances: the paper's balance signal
        stats = {"vq": vq, "d_sem": d[:, :sem_dim].sum(1).mean(), "d_pix": d[:, sem_dim:].sum(1).mean()}
        return z + (q - z).detach(), idx, stats  # straight-through: forward q, backward identity


def codebook_usage(counts):
    """A code histogram (K,) -> (fraction of the K codes hit at least once, its perplexity)."""
    p = counts.float() / counts.sum()
    return (p > 0).float().mean(), torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


# ---------------------------------------------------------------------------------------------
# The tokenizer: two encoders, multi-scale residual quantization, two decoders


def upsample(x_BCss, n):
    """One scale's codes (B, C, s, s) -> the full grid (B, C, n, n), bicubic as VAR and TokenFlow. On every
    device it runs as upsample_matmul (Speed variants), the same numbers as two small matmuls: forward +
    backward measured 3x faster on a CPU, and on CUDA free of the bicubic backward's atomic adds."""
    return upsample_matmul(x_BCss, n)  # = F.interpolate(x_BCss, size=(n, n), mode="bicubic")


def add_scale(f_hat_BCnn, q_BCss):
    """The running sum of upsampled codes, one scale further: f_hat (B, C, n, n) + q (B, C, s, s)
    upsampled to n x n. The quantizer builds f_hat with it and the GPT reads the same sums."""
    return f_hat_BCnn + upsample(q_BCss, f_hat_BCnn.shape[-1])


def cumulative_features(codes_BLC, scales):
    """The codes of all scales' ids (B, L, C) -> [f_hat (B, C, n, n) after scales 1..k for k = 1 .. S]: the
    running sum, coarse to fine, as the quantizer builds it (the GPT reads each as the next scale's input)."""
    f_hat = [codes_BLC.new_zeros(len(codes_BLC), codes_BLC.shape[2], scales[-1], scales[-1])]
    for s, q_BlC in zip(scales, codes_BLC.split([s * s for s in scales], dim=1)):
        f_hat.append(add_scale(f_hat[-1], q_BlC.transpose(1, 2).unflatten(2, (s, s))))
    return f_hat[1:]


class TokenFlow(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] <-> shared ids (B, L) over all scales; see the module docstring."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        n, D = cfg.grid, cfg.vit_width
        # TokenFlow has both halves. A half of width 0 is left out, which gives the paper's two
        # baselines: sem_dim = 0 is a VQGAN-style tokenizer, pix_dim = 0 a VQKD-style one (plus a
        # pixel decoder that reads its codes, as the paper's Fig. 8 decodes VQKD's).
        has_sem = cfg.sem_dim > 0
        # 1. semantic encoder: the teacher's ViT (load its weights before training), then a head
        self.sem_enc = ViT(3, cfg.patch_size, n, D, cfg.vit_depth, cfg.vit_heads, cfg.vit_stem_ch,
                           cfg.vit_quick_gelu) if has_sem else None
        self.sem_enc_head = mlp_head(D, cfg.sem_dim) if has_sem else None
        # 2. pixel encoder: VQGAN CNN ending in pix_dim channels on the same n x n grid
        self.pix_enc = PixelEncoder(cfg) if cfg.pix_dim else None
        # 3. the two codebooks, one index
        self.codebook = DualCodebook(cfg.codebook_size, cfg.sem_dim, cfg.pix_dim, cfg.pix_weight, cfg.beta)
        # 4. semantic decoder: a ViT over the semantic code grid (patch 1), then a head to T
        self.sem_dec = ViT(cfg.sem_dim, 1, n, D, cfg.sem_dec_depth, cfg.vit_heads) if has_sem else None
        self.sem_dec_head = mlp_head(D, cfg.teacher_dim) if has_sem else None
        # 5. pixel decoder: reads the pixel half only (the semantic codes, if there is no pixel half)
        self.pix_dec = PixelDecoder(cfg)
        if has_sem:
            init_weights(self.sem_enc_head)
            init_weights(self.sem_dec_head)

    # -- image -> continuous features -> quantized features (training and encoding)

    def features(self, x_B3HW):
        """(B, 3, H, W) in [-1, 1] -> z (B, sem_dim + pix_dim, n, n), not yet normalised."""
        B, n, halves = x_B3HW.shape[0], self.cfg.grid, []
        if self.sem_enc is not None:
            z_sem = self.sem_enc_head(self.sem_enc(teacher_input(x_B3HW, self.cfg)))  # (B, n*n, sem_dim)
            halves.append(z_sem.transpose(1, 2).reshape(B, -1, n, n))
        if self.pix_enc is not None:
            halves.append(self.pix_enc(x_B3HW))  # (B, pix_dim, n, n)
        return torch.cat(halves, dim=1)  # (B, C, n, n)

    def train_scales(self):
        """All scales; in training, with p = scale_drop, all but one random scale of index >= 1."""
        scales = list(self.cfg.scales)
        if self.training and len(scales) > 1 and torch.rand(()) < self.cfg.scale_drop:
            scales.pop(int(torch.randint(1, len(scales), ())))
        return scales

    def quantize(self, z_BCnn, scales):
        """Multi-scale residual VQ (VAR, Alg. 1): z (B, C, n, n) -> f_hat (B, C, n, n), ids per scale
        [(B, s*s)], stats. As in the official code each scale normalises its own residual, so f_hat is
        a sum of unit codes (upsampled), not an approximation of z itself."""
        B, C = z_BCnn.shape[:2]
        residual, f_hat, idx_Bl, stats = z_BCnn, torch.zeros_like(z_BCnn), [], []
        for s in scales:
            r_NC = F.interpolate(residual, size=(s, s), mode="area").permute(0, 2, 3, 1).reshape(-1, C)
            q_NC, idx_N, st = self.codebook(r_NC)
            f_hat = add_scale(f_hat, q_NC.view(B, s, s, C).permute(0, 3, 1, 2))
            residual = z_BCnn - f_hat.detach()  # later scales model what is left
            idx_Bl.append(idx_N.view(B, s * s))
            stats.append(st)
        stats = {k: torch.stack([st[k] for st in stats]).mean() for k in stats[0]}  # mean over scales
        stats["usage"], stats["perplexity"] = codebook_usage(
            torch.bincount(torch.cat(idx_Bl, 1).flatten(), minlength=self.cfg.codebook_size))
        return f_hat, idx_Bl, stats

    # -- ids -> quantized features -> image / teacher features (decoding)

    def indices_to_features(self, idx_BL):
        """(B, L) ids of all scales -> f_hat (B, C, n, n), the same sum the quantizer builds."""
        return self.cumulative_features(idx_BL)[-1]

    def cumulative_features(self, idx_BL):
        """(B, L) ids of all scales -> [f_hat (B, C, n, n) after scales 1..k for k = 1 .. S]."""
        cfg = self.cfg
        if idx_BL.ndim != 2 or idx_BL.shape[1] != cfg.seq_len:
            raise ValueError(f"token ids have shape {tuple(idx_BL.shape)}, expected (B, {cfg.seq_len}) "
                             f"for scales {cfg.scales}")
        if idx_BL.numel() and (idx_BL.min() < 0 or idx_BL.max() >= cfg.codebook_size):
            raise ValueError(f"token ids must lie in [0, {cfg.codebook_size}), the codebook size; got "
                             f"[{idx_BL.min().item()}, {idx_BL.max().item()}]")
        return cumulative_features(self.codebook.lookup(idx_BL), cfg.scales)

    def pixel_half(self, f_hat_BCnn):
        """What the pixel decoder reads: the pixel half or, without one, the semantic codes with their
        gradient stopped: a VQKD tokenizer learns from the teacher alone, its pixel decoder reads it."""
        return f_hat_BCnn[:, self.cfg.sem_dim:] if self.cfg.pix_dim else f_hat_BCnn.detach()

    def pixel_decode(self, f_hat_BCnn):
        return self.pix_dec(self.pixel_half(f_hat_BCnn))  # (B, 3, H, W), not clamped

    def semantic_decode(self, f_hat_BCnn):
        if self.sem_dec is None:
            raise ValueError("this tokenizer has no semantic half (sem_dim = 0: the pixel-only ablation)")
        return self.sem_dec_head(self.sem_dec(f_hat_BCnn[:, :self.cfg.sem_dim]))  # (B, n*n, T)

    # -- public interface

    @torch.no_grad()
    def encode(self, x_B3HW):
        """(B, 3, H, W) in [-1, 1] -> ids (B, L) long, all scales coarse to fine, row-major."""
        _, idx_Bl, _ = self.quantize(self.features(x_B3HW), self.cfg.scales)
        return torch.cat(idx_Bl, dim=1)

    @torch.no_grad()
    def decode(self, idx_BL):
        """(B, L) ids -> images (B, 3, H, W) in [-1, 1]."""
        return self.pixel_decode(self.indices_to_features(idx_BL)).clamp(-1, 1)

    @torch.no_grad()
    def semantic_features(self, idx_BL):
        """(B, L) ids -> decoded teacher-space features (B, n*n, T)."""
        return self.semantic_decode(self.indices_to_features(idx_BL))

    def forward(self, x_B3HW):
        """Training pass -> reconstruction (B, 3, H, W), decoded semantic features (B, n*n, T) (None
        without a semantic half) and a dict: vq (loss) and d_sem, d_pix (averaged over scales);
        usage, perplexity (over all scales' ids)."""
        f_hat, _, stats = self.quantize(self.features(x_B3HW), self.train_scales())
        sem = self.semantic_decode(f_hat) if self.sem_dec is not None else None
        return self.pixel_decode(f_hat), sem, stats


# ---------------------------------------------------------------------------------------------
# The generator: a GPT over the shared ids, every token of the next scale at once (VAR)


@dataclass
class GPTConfig:
    num_classes: int = 1000  # labels 0 .. num_classes - 1; the label num_classes is the null class
    width: int = 1024  # D (VAR-d16: width 1024, depth 16, 16 heads)
    depth: int = 16  # transformer blocks
    heads: int = 16  # attention heads
    class_drop: float = 0.1  # P(label -> null class) per training image, for classifier-free guidance
    vocab_size: int = 0  # UnifiedGPT only: words, SPECIAL_WORDS first (0: a class-conditional GPT)
    caption_len: int = 0  # UnifiedGPT only: W, the words of the longest caption

    def __post_init__(self):
        if self.width % self.heads or self.num_classes < 1:
            raise ValueError(f"GPT width {self.width} must be a multiple of heads {self.heads}, "
                             f"and num_classes ({self.num_classes}) at least 1")


class KVCache:
    """Keys and values of one attention layer for the tokens run so far (GPT sampling only). Called
    with the new tokens' keys and values (B, heads, l, d), it appends them and returns all of them."""

    def __init__(self):
        self.k = self.v = None

    def __call__(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v  # (B, heads, tokens so far, d)

    def rerun_view(self, l):
        """A read-only view for running the newest l tokens again with other inputs (multi-step sampling):
        they attend to this cache minus its last l entries; nothing is appended, the cache keeps the first run."""
        def attend(k, v):  # (B, heads, l, d) -> keys and values the re-run tokens attend to
            return torch.cat([self.k[:, :, :-l], k], dim=2), torch.cat([self.v[:, :, :-l], v], dim=2)
        return attend


class AdaLNBlock(nn.Module):
    """A pre-norm block conditioned on a vector c (B, D), after VAR's AdaLNSelfAttn and DiT's adaLN.
    One linear map of SiLU(c) gives six (B, D) vectors gate1, gate2, scale1, scale2, shift1, shift2 (VAR's
    order); with LN a LayerNorm without affine parameters, the block computes
        x = x + (1 + gate1) * attn(LN(x) * (1 + scale1) + shift1)
        x = x + (1 + gate2) * mlp(LN(x) * (1 + scale2) + shift2)
    VAR and DiT multiply each branch by gate, not 1 + gate (DiT zero-inits the map, so a new block is
    the identity). Here the map starts at zero too, so a new block is a plain pre-norm block."""

    def __init__(self, dim, heads):
        super().__init__()
        self.ln = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.zero_condition()

    def zero_condition(self):
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x_BlD, cond_BD, mask=None, cache=None):
        gate1, gate2, scale1, scale2, shift1, shift2 = self.ada(cond_BD)[:, None].chunk(6, dim=-1)  # (B, 1, D) each
        x = x_BlD + (1 + gate1) * self.attn(self.ln(x_BlD) * (1 + scale1) + shift1, mask, cache)
        return x + (1 + gate2) * self.mlp(self.ln(x) * (1 + scale2) + shift2)


def sample_logits(logits_NK, temperature=1.0, top_k=0, top_p=0.0, generator=None):
    """One id per row of logits (N, K) -> (N,). top_k > 0 keeps the k most likely ids, then 0 < top_p < 1 the
    smallest set of them whose probability reaches top_p (nucleus sampling, Holtzman et al. 2019); 0 turns
    either off. Filtering the top-k first avoids sorting all K ids. A temperature below float32's smallest
    normal number (0 included) picks the most likely id, the limit T -> 0; no logits, finite or not, give NaN."""
    big = torch.finfo(torch.float32).max
    logits = logits_NK.float().clamp(-big, big)  # an infinite logit (huge guidance) stays the largest
    ids = None  # positions in the (filtered, sorted) logits map back to ids through this
    if top_k > 0:
        logits, ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)  # sorted, most likely first
    elif 0 < top_p < 1:
        logits, ids = logits.sort(dim=-1, descending=True)
    if temperature < torch.finfo(torch.float32).tiny:
        pick = logits.argmax(-1, keepdim=True)  # greedy
    else:  # the largest logit becomes 0 before dividing: the rest may go to -inf (probability 0), never NaN
        probs = ((logits - logits.max(-1, keepdim=True).values) / temperature).softmax(-1)
        if 0 < top_p < 1:
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # the top id always stays
        pick = torch.multinomial(probs, 1, generator=generator)  # (N, 1); unnormalised weights are fine
    return (pick if ids is None else ids.gather(-1, pick)).squeeze(-1)


class GPT(nn.Module):
    """Class-conditional next-scale prediction (VAR, Sec. 3) over a tokenizer's shared ids. The tokens
    of scale k read the cumulative quantized feature after scale k-1 (the first scale's s*s tokens read
    the class embedding: VAR's start positions) and are predicted at once; scale k attends to scales
    <= k. The class embedding also conditions every block and the norm before the head by AdaLN, as
    VAR does. Built from a trained tokenizer, whose unit codes it keeps as a frozen, unsaved buffer."""

    def __init__(self, cfg, tokenizer):
        super().__init__()
        self.cfg = cfg
        scales, D, K = tokenizer.cfg.scales, cfg.width, tokenizer.cfg.codebook_size
        # 0. the tokenizer's side: unit codes [e_sem, e_pix] (K, C), scales, grid side
        codes = tokenizer.codebook.lookup(torch.arange(K, device=tokenizer.codebook.sem.device))
        self.register_buffer("codes", codes.detach().clone(), persistent=False)
        self.scales, self.grid = scales, tokenizer.cfg.grid
        level = torch.cat([torch.full((s * s,), si) for si, s in enumerate(scales)])  # (L,) scale of each position
        self.register_buffer("level", level, persistent=False)
        self.register_buffer("mask", level[None, :] <= level[:, None], persistent=False)  # (L, L) block-causal
        # 1. inputs: class embedding (start tokens), projected codes, position and level embeddings
        self.class_emb = nn.Embedding(cfg.num_classes + 1, D)
        self.word_embed = nn.Linear(codes.shape[1], D)
        self.pos_embed = nn.Parameter(torch.randn(len(level), D) * 0.02)
        self.level_embed = nn.Embedding(len(scales), D)
        # 2. transformer, 3. head over the K shared ids
        self.blocks = nn.ModuleList(AdaLNBlock(D, cfg.heads) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(D, elementwise_affine=False)
        self.head_ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))  # VAR's AdaLN before the head
        self.head = nn.Linear(D, K)
        init_weights(self)
        for block in self.blocks:
            block.zero_condition()  # (init_weights drew them)
        nn.init.zeros_(self.head_ada[1].weight)
        nn.init.trunc_normal_(self.class_emb.weight, std=0.02)
        nn.init.trunc_normal_(self.level_embed.weight, std=0.02)

    def check_inputs(self, labels_B, idx_BL=None):
        if labels_B.dtype != torch.long or ((labels_B < 0) | (labels_B > self.cfg.num_classes)).any():
            raise ValueError(f"class labels must be integers in [0, {self.cfg.num_classes}], with {self.cfg.num_classes} "
                             f"the null class (unconditional), got {labels_B.tolist()}")
        L, K = len(self.level), len(self.codes)
        if idx_BL is not None and (idx_BL.ndim != 2 or idx_BL.shape != (len(labels_B), L)):
            raise ValueError(f"token ids have shape {tuple(idx_BL.shape)}, expected ({len(labels_B)}, {L}) "
                             f"for scales {self.scales} and {len(labels_B)} labels")
        if idx_BL is not None and ((idx_BL < 0) | (idx_BL >= K)).any():
            raise ValueError(f"token ids must lie in [0, {K}), the codebook size")

    def scale_codes(self, idx_Bl, s):
        return self.codes[idx_Bl].transpose(1, 2).unflatten(2, (s, s))  # (B, C, s, s)

    def start_tokens(self, cond_BD):
        """The first scale's input: the class embedding on each of its s*s positions (VAR) -> (B, s*s, D)."""
        return cond_BD[:, None].expand(-1, self.scales[0] ** 2, -1)

    def next_input(self, f_hat_BCnn, s):
        """The cumulative feature, area-resized to the next scale's s x s tokens (VAR) -> (B, s*s, D)."""
        return self.word_embed(F.interpolate(f_hat_BCnn, size=(s, s), mode="area").flatten(2).transpose(1, 2))

    def embed(self, x_BlD, start):
        """Add position and level embeddings to the tokens at positions start .. start + l."""
        pos = slice(start, start + x_BlD.shape[1])
        return x_BlD + self.pos_embed[pos] + self.level_embed(self.level[pos])

    # -- teacher forcing (training)

    def forward(self, idx_BL, labels_B):
        """ids (B, L) of all scales and class labels (B,) -> logits (B, L, K): position i predicts
        idx[:, i] from the scales before its own. In training, labels become the null class
        with p = class_drop."""
        self.check_inputs(labels_B, idx_BL)
        if self.training and self.cfg.class_drop > 0:
            drop = torch.rand(len(labels_B), device=labels_B.device) < self.cfg.class_drop
            labels_B = torch.where(drop, self.cfg.num_classes, labels_B)
        cond = self.class_emb(labels_B)  # (B, D)
        return self.head(self.transformer(self.image_inputs(idx_BL, cond), cond, mask=self.mask))

    def image_inputs(self, idx_BL, cond_BD):
        """The inputs of all L positions, embedded (B, L, D): the start tokens, then for each next scale
        the sum of the codes so far (as the tokenizer builds it), area-resized to that scale."""
        f_hat = cumulative_features(self.codes[idx_BL], self.scales)
        x = [self.start_tokens(cond_BD)] + [self.next_input(f, s) for f, s in zip(f_hat, self.scales[1:])]
        return self.embed(torch.cat(x, dim=1), 0)

    def transformer(self, x_BlD, cond_BD, mask=None, caches=None):
        """Embedded inputs (B, l, D) through the blocks, each conditioned on cond (B, D) by AdaLN and,
        when sampling, attending through its cache too -> (B, l, D), normed and modulated for a head."""
        for block, cache in zip(self.blocks, caches or [None] * len(self.blocks)):
            x_BlD = block(x_BlD, cond_BD, mask, cache)
        scale, shift = self.head_ada(cond_BD)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        return self.ln_f(x_BlD) * (1 + scale) + shift

    # -- sampling

    def condition(self, labels_B, guided, caches):
        """Sampling's condition: the class embeddings (B, D), with guidance the null class's after them (2B, D)."""
        null = torch.full_like(labels_B, self.cfg.num_classes)
        return self.class_emb(torch.cat([labels_B, null]) if guided else labels_B)

    def scale_logits(self, x_BlD, cond, start, caches, t):
        """One scale's inputs (B, l, D) at positions start .. start + l through the blocks, each
        attending through its cache (a KVCache, or a rerun_view of one) -> logits (B*l, K); the batch
        holds conditional then unconditional rows when t is not None: CFG with weight t."""
        logits = self.head(self.transformer(self.embed(x_BlD, start), cond, caches=caches)).float()  # (B or 2B, l, K)
        if t is not None:
            cond, uncond = logits.chunk(2)
            logits = cond + t * (cond - uncond)  # CFG (Ho & Salimans 2022): (1 + t) c - t u, without inf - inf
        return logits.flatten(0, 1)

    @torch.no_grad()
    def generate(self, labels, cfg_scale=3.0, cfg_schedule="linear", temperature=1.0, top_k=0, top_p=0.0,
                 generator=None, refine=None):
        """Class labels (B,) long (UnifiedGPT: captions (B, W)) -> ids (B, L), one forward per scale, KV-cached.
        cfg_scale: classifier-free guidance weight t_max: logits = (1 + t) cond - t uncond, t = cfg_scale
          * k / (S - 1) at scale k = 0 .. S-1 ('linear', the official schedule) or cfg_scale ('constant');
          0 samples the conditional logits in one pass of B, otherwise one batched pass of 2B.
        temperature, top_k, top_p: see sample_logits. generator: a seeded torch.Generator.
        refine: TokenFlow's multi-step sampling, (top_k, top_p) pairs: each scale but the first is
          predicted again with its own sample fed in (the cumulative feature including it) and
          resampled, once per pair (paper: top_k, top_p = 1200, 0.8, refine [(100, 0.8), (1, 0.0)]).
          The cache keeps the first pass, so later scales see the same inputs as in training."""
        self.check_inputs(labels)
        if not (math.isfinite(cfg_scale) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"cfg_scale must be a finite number and temperature a finite number >= 0 (0: greedy); "
                             f"got cfg_scale {cfg_scale}, temperature {temperature}")
        if cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
        B, S, n = len(labels), len(self.scales), self.grid
        guided = cfg_scale != 0
        double = (lambda x: x.repeat(2, 1, 1)) if guided else (lambda x: x)  # same inputs for both halves
        caches = [KVCache() for _ in self.blocks]
        cond = self.condition(labels, guided, caches)  # (B or 2B, D)
        x, f_hat, start, out = self.start_tokens(cond), self.codes.new_zeros(B, self.codes.shape[1], n, n), 0, []
        for si, s in enumerate(self.scales):
            t = (cfg_scale * si / max(1, S - 1) if cfg_schedule == "linear" else cfg_scale) if guided else None
            idx_Bl = sample_logits(self.scale_logits(x, cond, start, caches, t), temperature, top_k, top_p,
                                   generator).view(B, s * s)
            for k_r, p_r in (refine or []) if si > 0 else []:  # multi-step sampling: re-predict this scale
                x_r = double(self.next_input(add_scale(f_hat, self.scale_codes(idx_Bl, s)), s))
                reruns = [cache.rerun_view(s * s) for cache in caches]  # the first pass's context, kept
                logits = self.scale_logits(x_r, cond, start, reruns, t)
                idx_Bl = sample_logits(logits, temperature, k_r, p_r, generator).view(B, s * s)
            f_hat = add_scale(f_hat, self.scale_codes(idx_Bl, s))
            out.append(idx_Bl)
            start += s * s
            if si + 1 < S:
                x = double(self.next_input(f_hat, self.scales[si + 1]))
        return torch.cat(out, dim=1)  # (B, L)


def gpt_loss(logits_BLK, idx_BL):
    """Next-scale prediction's loss: cross-entropy of every token given the scales before it."""
    return F.cross_entropy(logits_BLK.flatten(0, 1).float(), idx_BL.flatten())


# ---------------------------------------------------------------------------------------------
# The unified transformer: the same ids read into words and written from words (TokenFlow Sec. 4)

SPECIAL_WORDS = ("<null>", "<end>")  # word ids 0 and 1 of every vocabulary
NULL_WORD, END_WORD = 0, 1  # a caption's filler (all of it: the null caption, for CFG); after its last word
GENERATE, CAPTION = 0, 1  # the tasks, which AdaLN reads where the class-conditional GPT reads the class


def prefix_mask(first, then):
    """The mask (a + b, a + b) of [a tokens, b tokens]: the a attend among themselves as first (a, a) says
    and never to the b; the b attend to all a, and among themselves as then (b, b) says."""
    return torch.cat([torch.cat([first, first.new_zeros(len(first), len(then))], 1),
                      torch.cat([then.new_ones(len(then), len(first)), then], 1)])


class UnifiedGPT(GPT):
    """One transformer for both directions over a tokenizer's shared ids, the task in AdaLN's condition
    (Janus and Show-o train one model on both; the official TokenFlow code uses two LLMs).
      generate (text-to-image, as the official t2i/): [caption, W words] [image, L tokens by scale]. The
        words attend causally; each scale to the caption and to the scales up to its own; AdaLN and the
        first scale (the <img> token) read the task plus the caption's mean word embedding. Loss on the
        ids. In training the caption becomes the null caption (all NULL_WORD) with p = class_drop (CFG).
      caption (image-to-text, as the official i2t/, LLaVA): [f_hat through a 2-layer MLP projector,
        n*n tokens] [words]. The image prefix attends both ways (Show-o), each word to the prefix and
        the words before it; position n*n - 1 + j predicts words[:, j], position n*n - 1 + W END_WORD.
        view 'sem' or 'pix' zeroes the other half of f_hat (in training each caption reads a random
        view), so one reader measures what each half knows."""

    VIEWS = ("both", "sem", "pix")

    def __init__(self, cfg, tokenizer):
        if cfg.vocab_size <= len(SPECIAL_WORDS) or cfg.caption_len < 1:
            raise ValueError(f"a UnifiedGPT needs vocab_size > {len(SPECIAL_WORDS)} and caption_len >= 1, got {cfg}")
        super().__init__(replace(cfg, num_classes=2), tokenizer)  # the two "classes" are the tasks
        D, W, n = cfg.width, cfg.caption_len, self.grid
        self.sem_dim = tokenizer.cfg.sem_dim
        self.text_emb = nn.Embedding(cfg.vocab_size, D)
        self.text_pos = nn.Parameter(torch.randn(W, D) * 0.02)
        self.projector = nn.Sequential(nn.Linear(self.codes.shape[1], D), nn.GELU(), nn.Linear(D, D))
        self.text_head = nn.Linear(D, cfg.vocab_size)
        init_weights(nn.ModuleList([self.projector, self.text_head]))
        nn.init.trunc_normal_(self.text_emb.weight, std=0.02)
        causal = torch.ones(W, W, dtype=torch.bool).tril()
        self.register_buffer("t2i_mask", prefix_mask(causal, self.mask), persistent=False)  # (W + L, W + L)
        self.register_buffer("i2t_mask", prefix_mask(causal.new_ones(n * n, n * n), causal), persistent=False)

    def check_inputs(self, words_BW, idx_BL=None):
        W, V = self.cfg.caption_len, self.cfg.vocab_size
        if words_BW.dtype != torch.long or words_BW.shape[1:] != (W,) or ((words_BW < 0) | (words_BW >= V)).any():
            raise ValueError(f"captions must be word ids (B, {W}) long in [0, {V}), got {words_BW.dtype} "
                             f"{tuple(words_BW.shape)}")
        super().check_inputs(words_BW.new_zeros(len(words_BW)), idx_BL)  # (the task is not an input)

    def task(self, task, B):
        return self.class_emb(torch.full((B,), task, device=self.level.device))  # (B, D)

    def generate_condition(self, words_BW):  # AdaLN's condition of the generate task (B, D)
        return self.task(GENERATE, len(words_BW)) + self.text_emb(words_BW).mean(1)  # + the pooled caption

    def embed_text(self, words_Bw, start=0):  # the words at caption positions start .. start + w -> (B, w, D)
        return self.text_emb(words_Bw) + self.text_pos[start:start + words_Bw.shape[1]]

    def image_prefix(self, idx_BL, views):
        """f_hat of the ids (all scales), one view per row (views: B names), projected -> (B, n*n, D)."""
        f_hat = cumulative_features(self.codes[idx_BL], self.scales)[-1]
        keep = torch.ones(len(idx_BL), f_hat.shape[1], device=f_hat.device)
        keep[[v == "pix" for v in views], :self.sem_dim] = 0
        keep[[v == "sem" for v in views], self.sem_dim:] = 0
        x = self.projector((f_hat * keep[:, :, None, None]).flatten(2).transpose(1, 2))  # (B, n*n, D)
        return self.embed(x, len(self.level) - self.grid ** 2)  # the last scale's positions and level

    def forward(self, idx_BL, words_BW):
        """ids (B, L) and their captions (B, W) -> (image logits (B, L, K): generate; word logits (B, W + 1,
        V): caption, both views in eval, a random one per row in training)."""
        self.check_inputs(words_BW, idx_BL)
        B, W = words_BW.shape
        image_logits = self.head(self.t2i_hidden(idx_BL, words_BW)[:, W:])
        views = [self.VIEWS[i] for i in torch.randint(3, (B,))] if self.training else ["both"] * B
        x = torch.cat([self.image_prefix(idx_BL, views), self.embed_text(words_BW)], 1)  # (B, n*n + W, D)
        cond = self.task(CAPTION, B)
        word_logits = self.text_head(self.transformer(x, cond, mask=self.i2t_mask)[:, self.grid ** 2 - 1:])
        return image_logits, word_logits

    def t2i_hidden(self, idx_BL, words_BW):
        """The generate task's sequence through the blocks -> (B, W + L, D); null captions: see the class."""
        if self.training and self.cfg.class_drop > 0:
            drop = torch.rand(len(words_BW), device=words_BW.device) < self.cfg.class_drop
            words_BW = torch.where(drop[:, None], NULL_WORD, words_BW)
        cond = self.generate_condition(words_BW)
        x = torch.cat([self.embed_text(words_BW), self.image_inputs(idx_BL, cond)], 1)
        return self.transformer(x, cond, mask=self.t2i_mask)

    def condition(self, words_BW, guided, caches):
        """Sampling's condition: the caption (and with guidance the null caption after it) run into the
        caches; every row reads the generate task and its caption (generate_condition) -> (B or 2B, D)."""
        rows = torch.cat([words_BW, torch.full_like(words_BW, NULL_WORD)]) if guided else words_BW
        cond, W = self.generate_condition(rows), rows.shape[1]
        self.transformer(self.embed_text(rows), cond, mask=self.t2i_mask[:W, :W], caches=caches)  # the caption's mask
        return cond

    @torch.no_grad()
    def caption(self, idx_BL, view="both"):
        """ids (B, L) -> the most likely caption (B, W) word ids, one word at a time through a KV cache;
        NULL_WORD after END_WORD."""
        self.check_inputs(idx_BL.new_zeros(len(idx_BL), self.cfg.caption_len), idx_BL)  # (the ids' check)
        caches, cond, words = [KVCache() for _ in self.blocks], self.task(CAPTION, len(idx_BL)), []
        h = self.transformer(self.image_prefix(idx_BL, [view] * len(idx_BL)), cond, caches=caches)[:, -1]  # (B, D)
        for j in range(self.cfg.caption_len):
            words.append(self.text_head(h).argmax(-1))  # (B,)
            if j + 1 < self.cfg.caption_len:  # (after the last word, END is all there is to predict)
                h = self.transformer(self.embed_text(words[-1][:, None], j), cond, caches=caches)[:, -1]
        words = torch.stack(words, 1)
        return words.masked_fill((words == END_WORD).cumsum(1) > 0, NULL_WORD)  # END and what follows it


def caption_loss(word_logits_BWV, words_BW):
    """Cross-entropy of each caption word and of END_WORD after the last one (none after that)."""
    targets = torch.cat([words_BW, torch.full_like(words_BW[:, :1], NULL_WORD)], 1)  # (B, W + 1)
    end = (targets == NULL_WORD).int().argmax(1)  # the first filler: where END goes
    after = torch.arange(targets.shape[1], device=targets.device) > end[:, None]
    targets = targets.scatter(1, end[:, None], END_WORD).masked_fill(after, -100)
    return F.cross_entropy(word_logits_BWV.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


# ---------------------------------------------------------------------------------------------
# Losses of the real-scale recipe: a PatchGAN discriminator with hinge losses (VQGAN's; LPIPS, a
# fixed pretrained network, is utils/weights.py's)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) as VQGAN uses it: 4x4 convs, three of stride 2 (BatchNorm after the
    second and third) and one of stride 1 with BatchNorm, each followed by LeakyReLU(0.2), then a 4x4
    conv to one real/fake logit per patch: (B, 3, H, W) -> (B, 1, h, w)."""

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
    """The discriminator's hinge loss (VQGAN); the generator's term is -mean(logits_fake)."""
    return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()


def adaptive_weight(rec_loss, g_loss, last_layer):
    """VQGAN's balance (Esser et al. 2021, eq. 7): ||grad rec|| / ||grad g|| at the decoder's last layer."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach()


# ---------------------------------------------------------------------------------------------
# The judge: the classifier that scores generated images on a labelled toy dataset


class Judge(nn.Module):
    """A small VGG-style CNN (3x3 conv, BatchNorm, ReLU; three 2x max-pools; global average pool;
    linear) that reads what the decoder can draw: train.py --stage judge trains it on training images
    and their reconstructions (the toy teacher misreads half of those, which a person reads at a
    glance). none_class adds a "none of the classes" output (trained on shapes' blobs), so that an
    amorphous sample is not read as the nearest class. Images (B, 3, H, W) in [-1, 1] -> logits
    (B, num_classes + none_class); features() -> the pooled (B, 4 * width) vector FD-judge compares."""

    def __init__(self, num_classes, none_class=False, width=16):
        super().__init__()
        self.num_classes, self.none_class = num_classes, none_class
        conv = lambda c_in, c_out: [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        w = width
        self.body = nn.Sequential(*conv(3, w), *conv(w, w), nn.MaxPool2d(2), *conv(w, 2 * w), *conv(2 * w, 2 * w),
                                  nn.MaxPool2d(2), *conv(2 * w, 4 * w), nn.MaxPool2d(2), *conv(4 * w, 4 * w),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, num_classes + none_class)

    def features(self, x_B3HW):
        return self.body(x_B3HW)  # (B, 4 * width)

    def forward(self, x_B3HW):
        return self.head(self.body(x_B3HW))  # (B, num_classes + none_class) logits


# ---------------------------------------------------------------------------------------------
# Presets


def enhanced_decoder(cfg):
    """TokenFlow's enhanced pixel decoder, defined relative to the base one: "double both the number
    of residual layers and channel dimensions" (App. B.1). tokenflow-b: 256 channels and
    pix_dec_res_blocks 4, so 5 res blocks per level (the decoder builds pix_dec_res_blocks + 1, as
    VQGAN's), the official sizes (237.1M parameters); the toy preset's stays toy-sized."""
    return replace(cfg, pix_dec_ch=2 * cfg.pix_dec_ch, pix_dec_res_blocks=2 * cfg.pix_dec_res_blocks)


PRESETS = {
    # CPU toy: 32 px shapes, an 8x8 grid, a 4-layer toy teacher; trains in minutes on 2 cores
    "toy": {"tokenizer": TokenizerConfig(
        image_size=32, patch_size=4, vit_width=64, vit_depth=4, vit_heads=2, vit_stem_ch=32, teacher_dim=64,
        sem_mean=(0.5, 0.5, 0.5), sem_std=(0.5, 0.5, 0.5),  # toy teacher reads [-1, 1] as is
        pix_ch=32, pix_ch_mult=(1, 2, 2), pix_res_blocks=1, z_channels=64, pix_dec_ch=32, pix_dec_res_blocks=1,
        codebook_size=512, scales=(1, 2, 4, 6, 8), sem_dec_depth=2),
        "gpt": GPTConfig(num_classes=8, width=128, depth=4, heads=4)},
    # TokenFlow-B: CLIP ViT-B/16 teacher at 224 px, 14x14 grid, K = 32,768, L = 561
    "tokenflow-b": {"tokenizer": TokenizerConfig(vit_quick_gelu=True), "gpt": GPTConfig()},
}


# ---------------------------------------------------------------------------------------------
# Speed variants: the plain forms above, faster; each tested equal to its plain form


class ChannelsLastGroupNorm(nn.GroupNorm):
    """nn.GroupNorm that keeps its input's memory layout and dtype: fp32 statistics, output in x's dtype (as
    timm's fast_norm). PyTorch's CUDA kernel returns channels_last input contiguous (pytorch/pytorch#111824)
    and autocast runs it in fp32: a layout transform and two casts around every norm of a bf16 CNN."""

    def forward(self, x_BChw):
        x = x_BChw.unflatten(1, (self.num_groups, -1))  # (B, G, C/G, h, w): a view in either layout
        var, mean = torch.var_mean(x.float(), dim=(2, 3, 4), correction=0, keepdim=True)  # (B, G, 1, 1, 1)
        scale = (var + self.eps).rsqrt() * self.weight.view(self.num_groups, -1, 1, 1)  # (B, G, C/G, 1, 1)
        shift = self.bias.view(self.num_groups, -1, 1, 1) - mean * scale
        return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype)).flatten(1, 2)  # x * scale + shift, x's layout


def channels_last(model):
    """For CUDA, in place -> model: weights channels_last (cuDNN's NHWC convs) and every nn.GroupNorm a
    ChannelsLastGroupNorm (same parameters and state_dict), so activations stay channels_last throughout."""
    for module in model.modules():
        if type(module) is nn.GroupNorm:
            module.__class__ = ChannelsLastGroupNorm  # a subclass that only replaces forward
    return model.to(memory_format=torch.channels_last)


def score_rows(device, K):
    """Rows per chunk of nearest()'s (rows, K) scores, at least 1: 2**22 scores (16 MB) on a CPU, where a
    chunk that stays in cache is fastest; 2**28 (1 GiB) on a GPU, where one matmul of all rows is."""
    return max(1, (2**22 if device.type == "cpu" else 2**28) // K)


def in_row_chunks(fn, rows, *tensors):
    """fn(*tensors) for a row-wise fn, run on at most `rows` rows at a time and concatenated: the same
    result, with fn's memory bounded by the chunk (the nearest-code search's N x K scores)."""
    return torch.cat([fn(*chunk) for chunk in zip(*(t.split(rows) for t in tensors))])


BICUBIC = {}  # (s, n, device, dtype) -> the (n, s) matrix of upsample_matmul


def upsample_matmul(x_BCss, n):
    """upsample's F.interpolate(x, size=(n, n), mode="bicubic") (no align_corners, no antialias) is linear
    and separable: A x A^T with A (n, s) read off an identity. Its backward is two matmuls, not the CUDA
    kernel's atomic adds, which serialise where many outputs share few inputs (the small scales)."""
    s = x_BCss.shape[-1]
    if s == n:
        return x_BCss
    key = (s, n, x_BCss.device, x_BCss.dtype)
    if key not in BICUBIC:
        eye = torch.eye(s, dtype=torch.float64).view(1, s, s, 1)  # channel k: a unit impulse at row k
        BICUBIC[key] = F.interpolate(eye, size=(n, 1), mode="bicubic")[0, :, :, 0].T.to(x_BCss.device, x_BCss.dtype)
    A = BICUBIC[key]
    with torch.autocast(x_BCss.device.type, enabled=False):  # x's dtype; autocast would make fp32 codes bf16
        return A @ x_BCss @ A.T  # (B, C, n, n)
