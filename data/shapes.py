"""
Synthetic shapes, the toy run's data: 8 classes told apart by geometry alone, drawn large, near
the middle and upright, with colour, size, place and a textured background drawn independently
of the class, so that semantics (class) and appearance (pixels) are separable. Rendered on the
fly, deterministic per (seed, split, index); the 'val' split never repeats a 'train' image.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

import tokenflow as tf

SHAPES = ["disk", "ring", "triangle", "square", "plus", "star", "crescent", "bar"]
PALETTE = np.array([  # foreground colours, saturated so they stand out of the grey backgrounds
    [0.90, 0.15, 0.15], [0.15, 0.75, 0.20], [0.20, 0.35, 0.95], [0.95, 0.85, 0.15],
    [0.85, 0.20, 0.85], [0.10, 0.85, 0.90], [0.98, 0.55, 0.10], [0.55, 0.25, 0.85],
], dtype=np.float32)
COLOURS = ["red", "green", "blue", "yellow", "magenta", "cyan", "orange", "purple"]
# Captions "<colour> <shape>" (UnifiedGPT): one vocabulary, the model's special words first
VOCAB = [*tf.SPECIAL_WORDS, *COLOURS, *SHAPES]
CAPTION_LEN = 2
# (colour, shape) pairs the unified transformer never sees in training, one per colour and one per
# shape (a shifted diagonal of the 8 x 8 table: red star, green crescent, ...), so every word is seen
# with 7 others and composition is what the held-out pairs test (Okawa et al. 2023)
HELD_OUT_PAIRS = [(c, (c + 5) % len(SHAPES)) for c in range(len(COLOURS))]


def shape_sdf(cls, u, v):
    """Approximate signed distance (negative inside, in units of the shape radius) of every shape
    class at local coordinates u, v (B, H, W); -> (B, H, W) for the requested classes cls (B,)."""
    r, theta = torch.sqrt(u * u + v * v), torch.atan2(v, u)

    def ngon(k, radius, vertex, u=u, v=v):  # regular k-gon, circumradius radius, a vertex at angle vertex
        a, r, theta = 2 * math.pi / k, torch.sqrt(u * u + v * v), torch.atan2(v, u)
        return r * torch.cos(torch.remainder(theta - vertex, a) - a / 2) - radius * math.cos(math.pi / k)

    def box(hx, hy):
        qx, qy = u.abs() - hx, v.abs() - hy
        return torch.sqrt(qx.clamp_min(0) ** 2 + qy.clamp_min(0) ** 2) + torch.maximum(qx, qy).clamp_max(0)

    up = -math.pi / 2  # image rows grow downwards, so "up" is the angle -90 degrees
    spikes = torch.abs(torch.remainder((theta - up) * 5 / (2 * math.pi), 1.0) * 2 - 1)  # 1 at the 5 tips
    all_sdf = torch.stack([
        r - 1,  # disk
        (r - 0.72).abs() - 0.28,  # ring
        ngon(3, 1.15, up, v=v + 0.29),  # triangle, a vertex up, moved down to centre its height
        ngon(4, 1.15, math.pi / 4),  # square, sides level (a vertex up is a diamond)
        torch.minimum(box(1.0, 0.32), box(0.32, 1.0)),  # plus
        (r - (0.42 + 0.65 * spikes ** 2)) * 0.6,  # star, a tip up (scaled: the radial gap overstates distance)
        torch.maximum(r - 1, 0.8 - torch.sqrt((u - 0.5) ** 2 + v * v)),  # crescent
        box(1.05, 0.3),  # bar
    ], dim=1)  # (B, 8, H, W)
    return all_sdf.gather(1, cls.view(-1, 1, 1, 1).expand(-1, 1, *u.shape[1:])).squeeze(1)


def blob_sdf(u, v, wobble):
    """Signed distance (approximate, radius units) of a blob: a disk whose radius is 1 + a2 cos(2 theta
    + p2) + a3 cos(3 theta + p3), with wobble (B, 4) = (a2, a3, p2, p3) -> (B, H, W)."""
    r, theta = torch.sqrt(u * u + v * v), torch.atan2(v, u)
    a2, a3, p2, p3 = (w.view(-1, 1, 1) for w in wobble.unbind(1))
    return (r - (1 + a2 * torch.cos(2 * theta + p2) + a3 * torch.cos(3 * theta + p3))) * 0.7


class ShapesDataset(torch.utils.data.Dataset):
    """size images, each drawn from its own RNG keyed by (seed, split, index): deterministic, and the
    'val' split never repeats a 'train' image. Items are (image (3, S, S) in [-1, 1], class)."""

    classes = SHAPES
    num_classes = len(SHAPES)
    # The geometry (data/shapes/README.md, "levers"): large, near-centred, near-upright shapes put
    # the class into the coarse scales, which next-scale prediction settles first.
    radius = (0.38, 0.45)  # shape radius, in image widths
    centre = (0.455, 0.545)  # range of the centre's x and y, in image widths
    rotation = 0.0  # largest turn away from upright, in radians

    def __init__(self, size, image_size=32, seed=0, split="train"):
        self.size, self.image_size, self.seed, self.split = size, image_size, seed, split

    def __len__(self):
        return self.size

    def params(self, indices):
        """Draw every random choice of the given images -> dict of (B, ...) tensors."""
        rows = []
        for i in indices:
            g = np.random.default_rng([self.seed, {"train": 0, "val": 1}[self.split], int(i)])
            rows.append(dict(
                cls=g.integers(len(SHAPES)), colour=g.integers(len(PALETTE)),
                jitter=g.uniform(-0.06, 0.06, 3), centre=g.uniform(*self.centre, 2),
                radius=g.uniform(*self.radius), angle=g.uniform(-self.rotation, self.rotation), bg=g.uniform(0.2, 0.55) + g.uniform(-0.05, 0.05, 3),
                stripe=[g.uniform(0, math.pi), g.uniform(3, 8), g.uniform(0, 2 * math.pi), g.uniform(0.03, 0.08)],
                noise=g.normal(0, 0.04, (1, 8, 8)),
            ))
        return {k: torch.tensor(np.stack([r[k] for r in rows]), dtype=torch.float32) for k in rows[0]}

    def render(self, p):
        """params -> images (B, 3, S, S) in [-1, 1]."""
        S, B = self.image_size, p["cls"].shape[0]
        yy, xx = torch.meshgrid(*(2 * [(torch.arange(S) + 0.5) / S]), indexing="ij")  # pixel centres in [0, 1]
        # 1. background: grey-ish base, one sine grating, smooth low-frequency noise
        ang, freq, phase, amp = p["stripe"].unbind(1)
        wave = xx * torch.cos(ang).view(B, 1, 1) + yy * torch.sin(ang).view(B, 1, 1)
        bg = p["bg"].view(B, 3, 1, 1) + (amp.view(B, 1, 1) * torch.sin(2 * math.pi * freq.view(B, 1, 1) * wave
                                                                        + phase.view(B, 1, 1))).unsqueeze(1)
        bg = bg + F.interpolate(p["noise"], size=(S, S), mode="bilinear", align_corners=False)
        # 2. foreground: rotate/scale pixel coordinates into the shape's frame, anti-aliased edge
        dx, dy = xx - p["centre"][:, 0].view(B, 1, 1), yy - p["centre"][:, 1].view(B, 1, 1)
        c, s, rad = torch.cos(p["angle"]).view(B, 1, 1), torch.sin(p["angle"]).view(B, 1, 1), p["radius"].view(B, 1, 1)
        u, v = (c * dx + s * dy) / rad, (-s * dx + c * dy) / rad
        sdf = blob_sdf(u, v, p["wobble"]) if "wobble" in p else shape_sdf(p["cls"].long(), u, v)
        alpha = (0.5 - sdf * rad * S).clamp(0, 1).unsqueeze(1)  # distance in pixels -> coverage
        fg = (torch.from_numpy(PALETTE)[p["colour"].long()] + p["jitter"]).view(B, 3, 1, 1)
        return ((alpha * fg + (1 - alpha) * bg).clamp(0, 1) * 2 - 1)

    def blobs(self, indices):
        """Image i's colour, size, place and background around a blob that is none of the classes:
        a disk whose radius wobbles with harmonics 2 and 3 of the angle, drawn from its own RNG, so
        the classes' images stay as they are -> images (B, 3, S, S). They teach the judge to say
        "no shape" where a weak generator draws an amorphous potato (issue 14)."""
        p = self.params(indices)
        wobble = [np.random.default_rng([self.seed, {"train": 0, "val": 1}[self.split], int(i), 1]).uniform(
            [0.15, 0.15, 0, 0], [0.3, 0.3, 2 * math.pi, 2 * math.pi]) for i in indices]
        return self.render({**p, "wobble": torch.tensor(np.stack(wobble), dtype=torch.float32)})

    def captions(self, indices):
        """The caption of each image, from its own drawn colour and shape -> word ids (B, CAPTION_LEN) long."""
        p = self.params(indices)
        return torch.stack([p["colour"].long() + VOCAB.index(COLOURS[0]), p["cls"].long() + VOCAB.index(SHAPES[0])], 1)

    def __getitems__(self, indices):  # the DataLoader renders a whole batch in one call
        p = self.params(indices)
        return list(zip(self.render(p), p["cls"].long()))

    def __getitem__(self, i):
        return self.__getitems__([i])[0]


def held_out_pair(words_BW, pairs=HELD_OUT_PAIRS):
    """Which captions (B, 2) name one of the (colour, shape) pairs -> (B,) bool."""
    colour, shape = words_BW[:, 0] - VOCAB.index(COLOURS[0]), words_BW[:, 1] - VOCAB.index(SHAPES[0])
    return torch.stack([(colour == c) & (shape == s) for c, s in pairs]).any(0)


def caption_ids(text, vocab=VOCAB):
    """A prompt "<colour> <shape>" ("red star"), the only form the captions take -> word ids (2,) long;
    ValueError naming a word outside the vocabulary, or a prompt of another form."""
    words = text.split()
    unknown = [w for w in words if w not in vocab[len(tf.SPECIAL_WORDS):]]
    if unknown:
        raise ValueError(f"prompt {text!r}: {unknown[0]!r} is not in the vocabulary; "
                         f"use {', '.join(vocab[len(tf.SPECIAL_WORDS):])}")
    if len(words) != CAPTION_LEN or words[0] not in COLOURS or words[1] not in SHAPES:
        raise ValueError(f"prompt {text!r} is not '<colour> <shape>'; give a colour ({', '.join(COLOURS)}) "
                         f"then a shape ({', '.join(SHAPES)}), e.g. 'red star'")
    return torch.tensor([vocab.index(w) for w in words])


def caption_text(words_W, vocab=VOCAB):
    """Word ids -> the caption as text, without fillers and END_WORD."""
    return " ".join(vocab[i] for i in words_W.tolist() if i >= len(tf.SPECIAL_WORDS))
