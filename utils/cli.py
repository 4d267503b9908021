"""
Checks of what a user types, shared by the scripts. Every flag is checked when the command line
is parsed, so that bad input stops at once with one line naming the flag and the fix (exit code 2)
rather than with a traceback from deep inside a run; run_script turns the errors that the code
raises on bad files and data (ValueError, OSError) into that same one line.
"""

import argparse
import importlib.util
import math
import os
import shutil
import sys

import torch
from PIL import Image

from data.folders import listing  # (one-line messages name a few items; the scripts import it from here)

BAD_INPUT = (ValueError, OSError)  # what our checks and file reads raise on bad input: exit code 2


class OneLineErrors(argparse.ArgumentParser):
    """argparse's parser whose bad-input message is one line, 'prog: error: ...; see --help', exit code 2
    (argparse's own prints its usage block above it). The script's docstring is its --help text."""

    def __init__(self, doc):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def flag(name):
    """An argparse dest -> the flag as typed: 'top_p' -> '--top-p'."""
    return "--" + name.replace("_", "-")


def check_numbers(p, args, ranges):
    """ranges: {dest: (test(value) -> bool, 'what it must be')}. A value given (not None) that is not a
    finite number passing its test stops the parse (p.error) with a line naming the flag."""
    for name, (ok, must) in ranges.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and ok(value)):
            p.error(f"{flag(name)} must be {must}, got {value}")


SEED = (lambda v: 0 <= v < 2**63, "in [0, 2^63)")  # what torch and NumPy seeds take
SAMPLING_NUMBERS = {  # the sampling flags of sample.py and evaluate.py
    "cfg_scale": (lambda v: v >= 0, ">= 0 (a finite number; 0 = none)"),
    "temperature": (lambda v: v > 0, "> 0 (a finite number; below ~1e-38, greedy)"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "top_p": (lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)"),
    "seed": SEED,
}


def parse_refine(p, pairs):
    """--refine TOP_K,TOP_P ... -> [(top_k, top_p), ...] or None, each in the range of --top-k and --top-p."""
    try:
        refine = [(int(k), float(q)) for k, q in (pair.split(",") for pair in pairs or [])] or None
    except ValueError:
        p.error(f"--refine takes TOP_K,TOP_P pairs such as 100,0.8 1,0; got {' '.join(pairs)}")
    if any(k < 0 or not 0 <= q <= 1 for k, q in refine or []):
        p.error(f"--refine: top-k values must be >= 0 (0 = off) and top-p values in [0, 1] (0 = off); "
                f"got {' '.join(pairs)}")
    return refine


def check_device(p, device):
    """A device this machine has: cpu, cuda, cuda:N (N < the GPU count) or mps."""
    try:
        d = torch.device(device)
    except RuntimeError:
        p.error(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps")
    if d.type not in ("cpu", "cuda", "mps"):
        p.error(f"--device {device}: use cpu, cuda, cuda:N or mps")
    if d.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {device}: this machine has no CUDA GPU (or torch was built without CUDA); use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        p.error(f"--device {device}: there are only {torch.cuda.device_count()} GPUs (cuda:0 ...); pick one of them")
    if d.type == "mps" and not torch.backends.mps.is_available():
        p.error(f"--device {device}: MPS (Apple GPUs) is not available here; use --device cpu")


def device_and_dtype(p, device, dtype):
    """--device and --dtype with 'auto' resolved: the best device here (cuda, then mps, then cpu), and
    bfloat16 on a CUDA GPU that has it, else float32. A device this machine lacks stops the parse."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    check_device(p, device)
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


def compile_toolchain_missing(device):
    """What torch.compile's default backend (Inductor) lacks on this machine to build kernels for device,
    as a fix to name, or None: Triton for a CUDA GPU, a C++ compiler ($CXX, c++, g++ or clang++) for the CPU."""
    if device.startswith("cuda"):
        return None if importlib.util.find_spec("triton") else "Triton (pip install triton)"
    compilers = (os.environ.get("CXX") or "c++", "g++", "clang++")
    return None if any(map(shutil.which, compilers)) else "a C++ compiler (apt install g++, or set CXX)"


def check_folder(p, what, path):
    """A folder the run writes into (what: the flag, as typed): created if missing, so it must not be
    a file or an empty name."""
    if not path:
        p.error(f"{what} needs a folder name")
    if os.path.exists(path) and not os.path.isdir(path):
        p.error(f"{what} {path} is a file, not a folder; give a folder (it is created if missing)")


def check_input_file(p, what, path):
    """A file the run reads: it must exist and be a file (what is inside is checked when it is read)."""
    if not os.path.isfile(path):
        p.error(f"{what} {path!r} {'is a folder' if os.path.isdir(path) else 'does not exist'}; give the path of a file")


def check_output_file(p, what, path, extensions=None):
    """A file the run writes: not a folder, in a folder that exists, and (extensions: a tuple) named
    with one of them, so that a wrong name fails before the work rather than after it."""
    if path is None:
        return
    if not path or os.path.isdir(path):
        p.error(f"{what} {path!r} is {'a folder' if path else 'empty'}; give a file name")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        p.error(f"{what} {path}: the folder {os.path.dirname(path)} does not exist; create it first")
    if extensions and not path.lower().endswith(extensions):
        p.error(f"{what} {path}: name it with one of {listing(extensions, most=4)}")


COMMON_IMAGES = (".png", ".jpg", ".jpeg", ".webp")
IMAGE_OUTPUTS = COMMON_IMAGES + tuple(sorted(  # then every other kind Pillow writes
    e for e, fmt in Image.registered_extensions().items() if fmt in Image.SAVE and e not in COMMON_IMAGES))


def check_classes(found, expected, what, fix):
    """Two class lists (a checkpoint's, a dataset's) must be the same, or labels would mean other
    classes; a list that is None (a checkpoint from before class names were saved) is not checked."""
    if found is None or expected is None or list(found) == list(expected):
        return
    extra, lacking = [c for c in found if c not in expected], [c for c in expected if c not in found]
    how = [f"has {listing(extra)} too"] if extra else []
    how += [f"lacks {listing(lacking)}"] if lacking else []
    how = "; ".join(how) or "has them in another order"
    raise ValueError(f"{what} {how} (its classes: {listing(found)}; expected: {listing(expected)}); {fix}")


def run_script(main, argv=None, exit_codes=()):
    """main(argv); bad input (BAD_INPUT) and running out of GPU memory end as one line on stderr and
    exit code 2. exit_codes: (exception type, exit code) pairs for a script's own stops (train.py: a
    diverged run, 1)."""
    try:
        return main(argv)
    except tuple(t for t, _ in exit_codes) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(dict(exit_codes)[type(e)])
    except BAD_INPUT as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.cuda.OutOfMemoryError as e:  # CUDA's message is a paragraph; its first two sentences say enough
        print(f"error: {'. '.join(str(e).split('. ')[:2])}; lower --batch-size, or (train.py) raise --grad-accum: "
              "the same batch in that many smaller micro-batches", file=sys.stderr)
        sys.exit(2)
