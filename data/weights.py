"""
Pretrained weights every script may need, as files: a download happens once, into a cache, and
is checked against a published digest; a local file is used as it is. Nothing here downloads in
the tests or the toy run.
"""

import hashlib
import os
import shlex
import sys
import urllib.request

import tokenflow as tf
from data.checks import check_classes

CLIP_URL = ("https://openaipublic.azureedge.net/clip/models/"
            "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt")  # SHA-256 in the path
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_SHA256 = "397923af"  # torchvision puts the start of the file's SHA-256 in its name
LPIPS_URL = "https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1"  # LPIPS v0.1 VGG heads (taming's vgg.pth)
LPIPS_MD5 = "d507d7349b931f0638a25a48a722f98a"


def checked_download(url, path, algo, digest):
    """path, downloaded from url if missing; its algo ('sha256', 'md5') hex digest must start with
    digest. FileNotFoundError if the download fails, ValueError if the digest differs."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        print(f"downloading {url} -> {path}", file=sys.stderr)
        try:
            urllib.request.urlretrieve(url, path + ".part")
        except OSError as e:  # no network, a moved file, ...
            raise FileNotFoundError(f"{path} is missing and its download from {url} failed ({e}); "
                                    "fetch it on a machine with access and put it at that path") from e
        os.replace(path + ".part", path)
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(digest):
        raise ValueError(f"{path} has {algo} {h.hexdigest()}, expected {digest}...: a partial or altered "
                         "download; delete it and run again")
    return path


def fetch_clip():
    """OpenAI's ViT-B/16 file, downloaded once into $TOKENFLOW_CACHE (~/.cache/tokenflow); its SHA-256
    must be the one in the URL."""
    cache = os.environ.get("TOKENFLOW_CACHE", os.path.expanduser("~/.cache/tokenflow"))
    return checked_download(CLIP_URL, os.path.join(cache, os.path.basename(CLIP_URL)), "sha256", CLIP_URL.split("/")[-2])


def load_lpips(weights_dir):
    """LPIPS with weights_dir/vgg16-397923af.pth (torchvision's VGG16) and weights_dir/vgg.pth (the
    LPIPS heads), each downloaded once if missing and checked."""
    vgg = checked_download(VGG16_URL, os.path.join(weights_dir, "vgg16-397923af.pth"), "sha256", VGG16_SHA256)
    heads = checked_download(LPIPS_URL, os.path.join(weights_dir, "vgg.pth"), "md5", LPIPS_MD5)
    lpips, vgg_sd, heads_sd = tf.LPIPS(), tf.read_weights(vgg), tf.read_weights(heads)
    lpips.features.load_state_dict(tf.matching_weights(
        lpips.features, {k[len("features."):]: v for k, v in vgg_sd.items() if k.startswith("features.")}, vgg))
    lpips.lins.load_state_dict(tf.matching_weights(  # (a head missing from the file is named as ours: lins.i)
        lpips.lins, {f"{i}.weight": heads_sd[f"lin{i}.model.1.weight"] for i in range(5) if f"lin{i}.model.1.weight"
                     in heads_sd}, heads))
    return lpips.eval()


def teacher_path(teacher, out_dir):
    """--teacher -> a file: 'toy' is OUT_DIR/teacher.pt, 'clip-vit-b16' the cached CLIP download."""
    return {"toy": os.path.join(out_dir, "teacher.pt")}.get(teacher) or (
        fetch_clip() if teacher == "clip-vit-b16" else teacher)


def load_teacher(path, cfg, maybe_clip=True, classes=None):
    """The frozen teacher from a file (our teacher checkpoint, or CLIP weights unless maybe_clip is
    False), checked against the tokenizer config cfg and, for a teacher with a class head, against
    the run's class list (ValueError naming the differences)."""
    if maybe_clip and os.path.isfile(path) and "visual.conv1.weight" in tf.read_weights(path):
        return tf.clip_teacher(path, cfg).eval().requires_grad_(False)
    teacher, ckpt = tf.load_model(path, "teacher")
    out_dir = shlex.quote(os.path.dirname(path) or ".")
    check_classes(ckpt.get("classes"), classes, f"teacher {path}", "train a teacher on this data (python train.py "
                  f"--stage teacher --out-dir {out_dir}) or give the data it was trained on")
    diff = tf.config_diff(teacher.cfg, cfg, ("image_size", "patch_size", "vit_width", "vit_depth", "vit_heads",
                                             "vit_quick_gelu", "vit_stem_ch", "teacher_dim", "sem_mean", "sem_std"))
    if diff:
        raise ValueError(f"teacher {path} vs the tokenizer's config differ in {'; '.join(diff)}; "
                         "use the teacher of this preset")
    return teacher.eval().requires_grad_(False)
