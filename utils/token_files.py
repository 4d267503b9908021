"""
The GPT stage's training data: a dataset tokenized once into .npy files and reused while what
decides the ids (the tokenizer's encoders and codebook, the data) is the same. Under torchrun each
rank encodes its block of the images into its own file and rank 0 joins them.
"""

import json
import os

import numpy as np
import torch
from tqdm import tqdm

from data import TokenDataset, eval_loader
from utils.checkpoints import save_atomically
from utils.distributed import barrier, rank_block, rank_share


def cached_tokens(data, encode, prefix, meta, codebook_size, rank=0, world_size=1, show=True):
    """Every image of data through encode ((b, 3, H, W) -> ids (b, L)) once -> TokenDataset, cached in
    PREFIX_ids.npy, PREFIX_labels.npy and PREFIX_meta.json and reused while meta (what decides the
    ids; it must hold seq_len, L) is the same. The meta is written last and removed first, so a
    crash mid-write never leaves a meta beside other ids."""
    paths = {k: f"{prefix}_{k}" for k in ("ids.npy", "labels.npy", "meta.json")}
    if os.path.exists(paths["meta.json"]) and json.load(open(paths["meta.json"])) == meta:
        return TokenDataset(np.load(paths["ids.npy"], mmap_mode="r"), np.load(paths["labels.npy"]))
    barrier()  # every rank has read the old meta before rank 0 removes it
    if rank == 0:
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        if os.path.exists(paths["meta.json"]):
            os.remove(paths["meta.json"])
    ids, labels = encode_block(data, encode, meta["seq_len"], codebook_size, rank, world_size, show,
                               desc=f"tokenize {os.path.basename(prefix)}")
    for k, array in (("ids.npy", ids), ("labels.npy", labels)):
        save_atomically(f"{paths[k]}.rank{rank}", lambda f: np.save(f, array))
    barrier()
    if rank == 0:
        for k in ("ids.npy", "labels.npy"):
            parts = [f"{paths[k]}.rank{r}" for r in range(world_size)]
            joined = np.concatenate([np.load(p) for p in parts])
            save_atomically(paths[k], lambda f: np.save(f, joined))
            for p in parts:
                os.remove(p)
        save_atomically(paths["meta.json"], lambda f: f.write(json.dumps(meta).encode()))
    barrier()
    return TokenDataset(np.load(paths["ids.npy"], mmap_mode="r"), np.load(paths["labels.npy"]))


@torch.no_grad()
def encode_block(data, encode, seq_len, codebook_size, rank, world_size, show, desc):
    """This rank's block of data through encode -> (ids (b, L) uint16 or int32, labels (b,) int64)."""
    rows = rank_block(len(data), rank, world_size)
    ids = np.empty((len(rows), seq_len), np.uint16 if codebook_size <= 2**16 else np.int32)
    labels, start = np.empty(len(rows), np.int64), 0
    for x, y in tqdm(eval_loader(rank_share(data, rank, world_size), 256), desc=desc, dynamic_ncols=True,
                     disable=not show):
        ids[start:start + len(x)], labels[start:start + len(x)] = encode(x).numpy(), y.numpy()
        start += len(x)
    return ids, labels
