"""
Pictures the scripts write: image tensors as uint8 arrays and PNG grids, one row per tensor.
"""

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(x_B3HW):
    """[-1, 1] images -> (B, H, W, 3) uint8 numpy, the layout of image files and the ADM suite."""
    return ((x_B3HW.float() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()


def keep_class_examples(kept, y, *images, per_class=2, max_classes=16):
    """Grid material from one batch: adds to kept (class -> list of image tuples) item i of each
    images tensor while its class y[i] has fewer than per_class, for the first max_classes classes met."""
    for i, c in enumerate(y.tolist()):
        if (c in kept or len(kept) < max_classes) and len(kept.setdefault(c, [])) < per_class:
            kept[c].append(tuple(t[i] for t in images))
    return kept


def class_rows(kept):
    """keep_class_examples' dict -> one (B, 3, S, S) row per images tensor, classes in order."""
    return [torch.stack(row) for row in zip(*(t for c in sorted(kept) for t in kept[c]))]


def save_grid(rows, path, zoom=3, header=None):
    """rows: list of (B, 3, S, S) tensors in [-1, 1], one grid row each -> PNG, nearest-upscaled.
    header: a short text per column (or None), written in a white strip above the grid."""
    img = np.concatenate([np.concatenate(list(to_uint8(r)), axis=1) for r in rows], axis=0)  # (rows*S, B*S, 3)
    grid = Image.fromarray(img).resize((img.shape[1] * zoom, img.shape[0] * zoom), Image.NEAREST)
    if header:
        tile, strip = grid.width // len(header), 16
        framed = Image.new("RGB", (grid.width, grid.height + strip), "white")
        draw = ImageDraw.Draw(framed)
        for i, text in enumerate(header):
            draw.text((i * tile + 3, 2), text, fill="black")
        framed.paste(grid, (0, strip))
        grid = framed
    grid.save(path)
