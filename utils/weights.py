"""
Pretrained weights every script may need, as files: a download happens once, into a cache, and
is checked against a published digest; a local file is used as it is. Nothing here downloads in
the tests or the toy run. Weight files are read without running any code from them, CLIP's
TorchScript archive included, and mapped onto tokenflow.py's modules.
"""

import hashlib
import io
import math
import os
import pickle
import shlex
import sys
import urllib.request
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

import tokenflow as tf
from utils.checkpoints import config_diff, load_checkpoint, load_model, matching_weights, unwrapped
from utils.cli import check_classes

# ---------------------------------------------------------------------------------------------
# Downloads: once, into a cache, checked against a published digest

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


# ---------------------------------------------------------------------------------------------
# CLIP weights: OpenAI's checkpoint (a TorchScript archive as distributed, or a plain state dict)
# read without running any of its code, mapped onto tokenflow.py's ViT


class ScriptObject:
    """Stands in for a TorchScript module while unpickling: it keeps the attributes, runs nothing."""

    def __setstate__(self, state):
        self.state = state


class ScriptWeightsUnpickler(pickle.Unpickler):
    """The data.pkl of a TorchScript archive -> its object tree with tensors. Allowed: module objects
    (as ScriptObject), tensors whose bytes come from the archive, OrderedDict; nothing else."""

    DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
              "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
              "ByteStorage": torch.uint8, "BoolStorage": torch.bool}

    def __init__(self, zf, root):
        super().__init__(io.BytesIO(zf.read(f"{root}/data.pkl")))
        self.zf, self.root = zf, root

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return ScriptObject
        if module == "torch" and name in self.DTYPES:
            return self.DTYPES[name]
        allowed = {("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor, ("collections", "OrderedDict"): dict}
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a weights file")
        return allowed[(module, name)]

    def persistent_load(self, pid):  # ('storage', dtype, key, location, numel): the bytes of one storage
        _, dtype, key, _, numel = pid
        return torch.frombuffer(bytearray(self.zf.read(f"{self.root}/data/{key}")), dtype=dtype)[:numel]


def rebuild_tensor(storage, offset, size, stride, *_):
    return storage.as_strided(size, stride, offset)


def named_tensors(obj, prefix=""):
    """A ScriptObject tree -> {dotted name: tensor}, the keys a state_dict would have."""
    out = {}
    for k, v in (obj.state if isinstance(obj, ScriptObject) else obj).items():
        if isinstance(v, torch.Tensor):
            out[prefix + k] = v
        elif isinstance(v, (ScriptObject, dict)):
            out.update(named_tensors(v, f"{prefix}{k}."))
    return out


def read_weights(path):
    """A weights file -> {name: tensor} without running code from it: a TorchScript archive is
    unpickled by ScriptWeightsUnpickler, anything else by torch.load(weights_only=True)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if any(n.endswith("/constants.pkl") for n in names):  # what marks TorchScript
                root = names[0].split("/")[0]
                return unwrapped(named_tensors(ScriptWeightsUnpickler(zf, root).load()))
    sd = load_checkpoint(path)  # torch.load(weights_only=True), with its clear errors
    return unwrapped(sd.get("state_dict", sd))


def resize_positions(pos_1ND, grid):
    """Position embeddings (1 + g*g, D) -> (1 + grid*grid, D): the class token's kept, the g x g patch
    grid bicubic-resized, so CLIP at 224 px (14 x 14) can run at 256 px (16 x 16), as the
    official --infer_interpolate."""
    g = math.isqrt(pos_1ND.shape[0] - 1)
    if g == grid:
        return pos_1ND
    patches = pos_1ND[1:].T.reshape(1, -1, g, g)  # (1, D, g, g)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos_1ND[:1], patches.reshape(-1, grid * grid).T])


def load_clip(path, grid=None):
    """OpenAI CLIP weights (ViT-B/16 or any other ViT) -> our ViT with QuickGELU; sizes come from the
    tensor shapes, and grid (default: CLIP's own) resizes the position embeddings. Called on
    CLIP-normalised images it returns the patch tokens after ln_post (B, N, width); its extra
    `proj` (Linear, no bias) maps them to CLIP's embedding space."""
    sd = {k[len("visual."):]: v.float() for k, v in read_weights(path).items()
          if k.startswith("visual.") and isinstance(v, torch.Tensor)}
    lacks = [f"visual.{k}" for k in ("conv1.weight", "positional_embedding", "proj", "transformer.resblocks.0.ln_1.weight")
             if k not in sd]
    if lacks:
        raise ValueError(f"{path} has no {', '.join(lacks)}: not a CLIP checkpoint with a ViT image encoder")
    width, _, patch, _ = sd["conv1.weight"].shape
    grid = grid or math.isqrt(sd["positional_embedding"].shape[0] - 1)
    sd["positional_embedding"] = resize_positions(sd["positional_embedding"], grid)
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    vit = tf.ViT(3, patch, grid, width, depth, width // 64, quick_gelu=True)  # CLIP: 64-d heads
    ours = {k: k for k in ("conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight",
                           "ln_pre.bias", "ln_post.weight", "ln_post.bias")}  # our name -> CLIP's
    names = {"attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
             "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
             "mlp.c_fc.weight": "mlp.0.weight", "mlp.c_fc.bias": "mlp.0.bias", "mlp.c_proj.weight": "mlp.2.weight",
             "mlp.c_proj.bias": "mlp.2.bias", "ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias",
             "ln_2.weight": "ln_2.weight", "ln_2.bias": "ln_2.bias"}
    for i in range(depth):
        ours.update({f"blocks.{i}.{b}": f"transformer.resblocks.{i}.{a}" for a, b in names.items()})
    # a missing or misshapen tensor stops here, named
    vit.load_state_dict(matching_weights(vit, {k: sd[c] for k, c in ours.items() if c in sd}, f"CLIP weights {path}"))
    vit.proj = nn.Linear(width, sd["proj"].shape[1], bias=False)
    vit.proj.weight.data.copy_(sd["proj"].T)  # CLIP applies x @ proj
    return vit


def clip_teacher(path, cfg):
    """CLIP weights as a Teacher for cfg (position embeddings resized to cfg.grid); the ViT sizes
    come from the weights and must be the preset's (ValueError naming both otherwise)."""
    vit = load_clip(path, grid=cfg.grid)
    found = {"patch_size": vit.conv1.kernel_size[0], "vit_width": len(vit.class_embedding),
             "vit_depth": len(vit.blocks), "vit_heads": vit.blocks[0].attn.heads,
             "teacher_dim": vit.proj.out_features, "vit_stem_ch": 0, "vit_quick_gelu": True}
    diff = [f"{k} = {v} vs {getattr(cfg, k)}" for k, v in found.items() if v != getattr(cfg, k)]
    if diff:
        raise ValueError(f"CLIP weights {path} vs the preset differ in {'; '.join(diff)} (CLIP vs preset)")
    teacher = tf.Teacher(cfg)
    teacher.proj.load_state_dict(vit.proj.state_dict())
    del vit.proj
    teacher.vit.load_state_dict(vit.state_dict())
    return teacher


# ---------------------------------------------------------------------------------------------
# LPIPS, a fixed pretrained network, with its weights; the teacher of a run


class LPIPS(nn.Module):
    """Learned perceptual distance, v0.1 (Zhang et al. 2018, https://arxiv.org/abs/1801.03924): VGG16
    features at relu1_2 .. relu5_3, unit-normalised over channels, squared differences weighted per
    channel by 1x1 heads, averaged over space, summed over layers. Images in [-1, 1] -> (B,); weights:
    load_lpips below; the tokenizer's recipe adds it to the pixel loss."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:
            layers += [nn.MaxPool2d(2)] if v == "M" else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = c if v == "M" else v
        self.features = nn.Sequential(*layers)  # the indices of torchvision's vgg16().features
        self.taps = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        self.lins = nn.ModuleList(nn.Conv2d(ch, 1, 1, bias=False) for ch in (64, 128, 256, 512, 512))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))  # LPIPS's input
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))  # normalisation
        self.requires_grad_(False)

    def forward(self, x, y):
        h, dist, lins = (torch.cat([x, y]) - self.shift) / self.scale, 0, iter(self.lins)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fx, fy = f.chunk(2)
                dist = dist + next(lins)((fx - fy) ** 2).mean((2, 3))
        return dist.flatten()  # (B,)



def load_lpips(weights_dir):
    """LPIPS with weights_dir/vgg16-397923af.pth (torchvision's VGG16) and weights_dir/vgg.pth (the
    LPIPS heads), each downloaded once if missing and checked."""
    vgg = checked_download(VGG16_URL, os.path.join(weights_dir, "vgg16-397923af.pth"), "sha256", VGG16_SHA256)
    heads = checked_download(LPIPS_URL, os.path.join(weights_dir, "vgg.pth"), "md5", LPIPS_MD5)
    lpips, vgg_sd, heads_sd = LPIPS(), read_weights(vgg), read_weights(heads)
    lpips.features.load_state_dict(matching_weights(
        lpips.features, {k[len("features."):]: v for k, v in vgg_sd.items() if k.startswith("features.")}, vgg))
    lpips.lins.load_state_dict(matching_weights(  # (a head missing from the file is named as ours: lins.i)
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
    if maybe_clip and os.path.isfile(path) and "visual.conv1.weight" in read_weights(path):
        return clip_teacher(path, cfg).eval().requires_grad_(False)
    teacher, ckpt = load_model(path, "teacher")
    out_dir = shlex.quote(os.path.dirname(path) or ".")
    check_classes(ckpt.get("classes"), classes, f"teacher {path}", "train a teacher on this data (python train.py "
                  f"--stage teacher --out-dir {out_dir}) or give the data it was trained on")
    diff = config_diff(teacher.cfg, cfg, ("image_size", "patch_size", "vit_width", "vit_depth", "vit_heads",
                                             "vit_quick_gelu", "vit_stem_ch", "teacher_dim", "sem_mean", "sem_std"))
    if diff:
        raise ValueError(f"teacher {path} vs the tokenizer's config differ in {'; '.join(diff)}; "
                         "use the teacher of this preset")
    return teacher.eval().requires_grad_(False)
