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


def save_grid(rows, path, zoom=3, header=None, row_labels=None, captions=None):
    """rows: list of (B, 3, S, S) tensors in [-1, 1], one grid row each -> PNG, nearest-upscaled.
    header: a short text per column, written in a white strip above the grid; row_labels: a text per
    row, in a strip on the left; captions: per row, a text per image, in a strip under the row."""
    tiles = [Image.fromarray(np.concatenate(list(to_uint8(r)), axis=1)) for r in rows]  # (S, B*S, 3) each
    tiles = [t.resize((t.width * zoom, t.height * zoom), Image.NEAREST) for t in tiles]
    top, left, under = 16 if header else 0, 6 * max(map(len, row_labels)) + 8 if row_labels else 0, 14 if captions else 0
    grid = Image.new("RGB", (left + max(t.width for t in tiles), top + sum(t.height + under for t in tiles)), "white")
    draw, y, tile = ImageDraw.Draw(grid), top, tiles[0].height
    for i, text in enumerate(header or []):
        draw.text((left + i * tile + 3, 2), text, fill="black")
    for r, t in enumerate(tiles):
        grid.paste(t, (left, y))
        if row_labels:
            draw.text((3, y + t.height // 2 - 6), row_labels[r], fill="black")
        for i, text in enumerate(captions[r] if captions else []):
            draw.text((left + i * tile + 2, y + t.height + 1), text, fill="black")
        y += t.height + under
    grid.save(path)
