"""
Checkpoints: the files train.py writes and every script reads back. A checkpoint is a plain dict of
tensors and primitives ({kind, config, model, step, ...}), so torch.load(weights_only=True) reads it
without running any code; load_model rebuilds a model of tokenflow.py from its checkpoint alone.
What a training run keeps beside the model, and when it writes, is utils/train_state.py's.
"""

import hashlib
import os
import pickle
import re
import shlex
from dataclasses import asdict, fields

import torch

import tokenflow as tf
from utils.cli import check_classes

# ---------------------------------------------------------------------------------------------
# Checkpoint files: written atomically, read without running code, models rebuilt from them alone


def config_diff(a, b, keys=None):
    """Fields where configs a and b differ -> ["name = a_value vs b_value", ...]."""
    return [f"{k} = {getattr(a, k)} vs {getattr(b, k)}" for k in keys or asdict(a) if getattr(a, k) != getattr(b, k)]


def config_from_dict(cls, d):
    """Rebuild a config dataclass from a checkpoint's plain dict, naming any unknown field."""
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"config has fields {sorted(unknown)} that {cls.__name__} does not know; "
                         "the checkpoint comes from another version of this code")
    return cls(**d)


def save_atomically(path, write):
    """write(file) into PATH.tmp, fsync, then a rename: atomic on POSIX, so a reader sees the old
    file or the new one and a crash never leaves half a file."""
    with open(f"{path}.tmp", "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)


def save_checkpoint(path, kind, config, model, step=0, **extra):
    """Write {kind, config, model, step, **extra} atomically."""
    ckpt = {"kind": kind, "config": asdict(config), "model": model.state_dict(), "step": step, **extra}
    save_atomically(path, lambda f: torch.save(ckpt, f))


MADE_BY = {"teacher.pt": "--stage teacher", "tokenizer.pt": "--stage tokenizer", "judge.pt": "--stage judge",
           "gpt.pt": "--stage gpt", "unified.pt": "--stage unified",
           "decoder.pt": "--stage tokenizer --finetune-decoder --enhanced-decoder"}  # train.py's files and flags


def missing_file_hint(path, kind):
    """What to do about a checkpoint that is not there: the train.py command that writes it."""
    out_dir, name = os.path.dirname(path) or ".", os.path.basename(path)
    if name in MADE_BY:
        return f"train it first: python train.py {MADE_BY[name]} --out-dir {shlex.quote(out_dir)}"
    if kind in ("teacher", "tokenizer", "judge", "gpt", "unified"):
        return f"check the path (python train.py --stage {kind} --out-dir DIR writes DIR/{kind}.pt)"
    return "check the path"


def load_checkpoint(path, kind=None):
    """Read a checkpoint without running any code; if kind is given ('teacher', 'tokenizer', 'judge', 'gpt'),
    check it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}; {missing_file_hint(path, kind)}") from None
    except OSError as e:  # a folder, no permission, ...
        raise FileNotFoundError(f"cannot read {path} ({type(e).__name__}: {e.strerror}); give a checkpoint file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        lines = [line for line in str(e).splitlines() if line.strip()] or ["empty or cut short"]
        why = next((line for line in lines if line.startswith("Unsupported")), lines[0])  # torch's says which
        raise ValueError(f"{path} is not a checkpoint this code can read safely ({type(e).__name__}: {why}); it is "
                         "not a file of train.py, is corrupt, or holds more than tensors and plain values") from None
    if not isinstance(ckpt, dict) or (kind is not None and ckpt.get("kind") != kind):
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} holds a {found!r} checkpoint, expected {kind!r}"
                         + ("; it is not a checkpoint of train.py (a bare state dict?)" if found is None else ""))
    if kind is not None and not {"config", "model"} <= ckpt.keys():
        raise ValueError(f"{path} lacks {sorted({'config', 'model'} - ckpt.keys())}: not a whole checkpoint of train.py")
    return ckpt


def unwrapped(state_dict):
    """Names without the prefixes that wrappers add to the same weights: DDP's 'module.' in front,
    torch.compile's '_orig_mod.' in front of the module it compiled (nanoGPT strips the same)."""
    return {re.sub(r"^(module\.)+", "", k).replace("_orig_mod.", ""): v for k, v in state_dict.items()}


def matching_weights(model, state_dict, source):
    """A state dict checked against a model (wrapper prefixes stripped) -> the dict to load. Missing,
    unexpected or misshapen tensors -> ValueError: their counts and the first few names."""
    sd, own = unwrapped(state_dict), model.state_dict()
    shape = lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
    problems = {"missing": [k for k in own if k not in sd], "unexpected": [k for k in sd if k not in own],
                "misshapen": [f"{k} {shape(sd[k])} vs {shape(own[k])}" for k in own if k in sd
                              and shape(sd[k]) != shape(own[k])]}
    if any(problems.values()):
        found = "; ".join(f"{len(v)} {what} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                          for what, v in problems.items() if v)
        raise ValueError(f"{source} does not fit a {type(model).__name__} of its config: {found}; it was saved by "
                         "other code or for other sizes")
    return sd


def tokenizer_id(tokenizer):
    """SHA-256 of what decides the ids: both encoders and the codebook (not the decoders, so a
    finetuned decoder keeps its token files and GPT)."""
    h = hashlib.sha256()
    for name, t in sorted(tokenizer.state_dict().items()):
        if name.startswith(("sem_enc", "pix_enc", "codebook")):
            h.update(name.encode())
            h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_resumable_on(path, kind, tokenizer, source):
    """--resume of a checkpoint trained on a tokenizer's ids (a GPT; a finetuned decoder's tokenizer,
    whose encoders and codebook must be tokenizer's): ValueError if it was another tokenizer's
    (source: where tokenizer came from). Nothing to check without a file yet."""
    if not os.path.exists(path):
        return
    ckpt = load_checkpoint(path, kind)
    theirs = ckpt["tokenizer_id"] if kind in ("gpt", "unified") else tokenizer_id(load_model(path, kind)[0])
    if theirs != tokenizer_id(tokenizer):
        raise ValueError(f"cannot resume {path}: it was trained on the ids of another tokenizer than {source} "
                         f"({theirs[:12]} vs {tokenizer_id(tokenizer)[:12]}; retrained since?); drop --resume to "
                         "train it on the current tokenizer, or use another --out-dir")


def load_model(path, kind, tokenizer=None, classes=None, fix=""):
    """Rebuild a 'teacher', 'tokenizer', 'judge', 'gpt' or 'unified' from its checkpoint alone -> (model,
    checkpoint dict), with the EMA weights where training kept them. A GPT (or UnifiedGPT) needs the tokenizer it was trained on,
    whose codebook size and scales must match. classes (the run's class names): the checkpoint's must
    be the same (ValueError ending in fix, what to do, otherwise)."""
    ckpt = load_checkpoint(path, kind)
    check_classes(ckpt.get("classes"), classes, f"{kind} {path}", fix)
    if kind in ("gpt", "unified"):
        theirs = config_from_dict(tf.TokenizerConfig, ckpt["tokenizer_config"])
        diff = [f"{k} {getattr(theirs, k)} vs {getattr(tokenizer.cfg, k)}" for k in
                ("codebook_size", "scales", "sem_dim", "pix_dim") if getattr(theirs, k) != getattr(tokenizer.cfg, k)]
        if diff:
            raise ValueError(f"{kind} {path} was trained on a tokenizer with other tokens: {'; '.join(diff)} "
                             f"({kind}'s tokenizer vs this one); give the tokenizer it was trained with")
        if ckpt.get("tokenizer_id", tokenizer_id(tokenizer)) != tokenizer_id(tokenizer):  # same sizes, other weights: other ids
            raise ValueError(f"{kind} {path} was trained on another tokenizer's ids than the one given; give that "
                             f"tokenizer, or retrain on this one (python train.py --stage {kind} --out-dir DIR, "
                             "DIR/tokenizer.pt being it)")
        model = (tf.GPT if kind == "gpt" else tf.UnifiedGPT)(config_from_dict(tf.GPTConfig, ckpt["config"]), tokenizer)
    else:
        cfg = config_from_dict(tf.TokenizerConfig, ckpt["config"])
        model = {"teacher": lambda: tf.Teacher(cfg, ckpt["num_classes"]), "tokenizer": lambda: tf.TokenFlow(cfg),
                 "judge": lambda: tf.Judge(ckpt["num_classes"], ckpt["none_class"], ckpt["width"])}[kind]()
    model.load_state_dict(matching_weights(model, ckpt.get("ema", ckpt["model"]), path))
    return model, ckpt
