"""
The README's Results table, from a fresh clone, in one command (about 24 min on 2 CPU cores):

    python data/shapes/results.py                    # trains into out/results/, prints the table
    python data/shapes/results.py --eval-only        # the table again from the trained models

It trains one toy teacher; three tokenizers with the same steps, batch and learning rate
(train.py --codebook dual: TokenFlow, pixel: VQGAN-style, semantic: VQKD-style); and the judge and
the GPT on the dual one, as the default toy run does. It then runs `evaluate.py eval` and
`evaluate.py probe` (mean-pooled and whole-grid features) on each. Last, dual and pixel again
with K = 4,096 codes, which the held-out tokens cannot all hit, for codebook usage (the paper's
Fig. 7). The tables go to OUT_DIR/results.md; every stage also appends its rows to
OUT_DIR/<run>/metrics.jsonl.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import evaluate  # noqa: E402  (the repo root is on the path only now)
import train  # noqa: E402
from utils.cli import run_script  # noqa: E402

CODEBOOKS = ["dual", "pixel", "semantic"]
PROBE_KINDS = ["semantic", "pixel", "both", "teacher"]
LARGE_K = 4096  # the toy's K = 512 is saturated by 123,904 held-out tokens; this is not


def pct(v):
    return "–" if v is None else f"{100 * v:.1f}"


def probe_cells(rows, target):
    by_kind = {r["features"]: r.get(f"{target}_acc") for r in rows}
    return " / ".join(pct(by_kind.get(k)) for k in PROBE_KINDS)


def table(results, large_k):
    """results: codebook -> {"eval": rows, "mean": probe rows, "grid": probe rows}; large_k: codebook ->
    its tokenizer's eval row at K = LARGE_K -> markdown."""
    lines = ["| tokenizer | PSNR (dB) | SSIM | usage | perplexity | sem. cosine | recon_acc "
             "| class probe, mean-pooled: sem / pix / both / teacher | colour probe, mean-pooled "
             "| class probe, whole grid | colour probe, whole grid |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        ev = r["eval"][0]
        sem_cos = f"{ev['sem_cos']:.3f}" if "sem_cos" in ev else "–"
        lines.append(f"| {name} | {ev['psnr']:.2f} | {ev['ssim']:.3f} | {pct(ev['usage'])}% | {ev['perplexity']:.0f} "
                     f"| {sem_cos} | {pct(ev.get('recon_acc'))} | {probe_cells(r['mean'], 'class')} "
                     f"| {probe_cells(r['mean'], 'colour')} | {probe_cells(r['grid'], 'class')} "
                     f"| {probe_cells(r['grid'], 'colour')} |")
    lines += ["", "| generator on dual | cfg | class_acc | colours | sem_class_acc | FD-judge (real floor) "
              "| FD-teacher (real floor) |", "|---|---|---|---|---|---|---|"]
    for g in results["dual"]["eval"][1:]:
        lines.append(f"| {g['images']} samples | {g['cfg']:g} | {pct(g.get('class_acc'))} | {g['colours']:.2f} "
                     f"| {pct(g.get('sem_class_acc'))} | {g['fd_judge']:.2f} ({g['fd_judge_real']:.2f}) "
                     f"| {g['fd_teacher']:.1f} ({g['fd_teacher_real']:.2f}) |")
    lines += ["", f"| K = {LARGE_K:,} | PSNR (dB) | SSIM | usage | perplexity |", "|---|---|---|---|---|"]
    for name, ev in large_k.items():
        lines.append(f"| {name} | {ev['psnr']:.2f} | {ev['ssim']:.3f} | {pct(ev['usage'])}% | {ev['perplexity']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join("out", "results"), help="everything goes here")
    p.add_argument("--seed", type=int, default=0, help="seeds every stage (train.py --seed)")
    p.add_argument("--eval-only", action="store_true", help="skip training: evaluate the models in OUT_DIR")
    args = p.parse_args(argv)
    teacher, seed, start = os.path.join(args.out_dir, "teacher.pt"), ["--seed", str(args.seed)], time.time()
    if not args.eval_only:
        train.main(["--stage", "teacher", "--out-dir", args.out_dir, *seed])
        for codebook in CODEBOOKS:
            for stage in ["tokenizer", "judge", "gpt"] if codebook == "dual" else ["tokenizer"]:
                train.main(["--stage", stage, "--codebook", codebook, "--teacher", teacher,
                            "--out-dir", os.path.join(args.out_dir, codebook), *seed])
        for codebook in ("dual", "pixel"):
            train.main(["--stage", "tokenizer", "--codebook", codebook, "--codebook-size", str(LARGE_K),
                        "--teacher", teacher, "--out-dir", os.path.join(args.out_dir, f"{codebook}-k{LARGE_K}"), *seed])
    results = {}
    for codebook in CODEBOOKS:
        common = ["--out-dir", os.path.join(args.out_dir, codebook), "--teacher", teacher, "--seed", str(args.seed)]
        results[codebook] = {"eval": evaluate.main(["eval", *common]),
                             **{pool: evaluate.main(["probe", "--pool", pool, *common]) for pool in ("mean", "grid")}}
    large_k = {codebook: evaluate.main(["eval", "--out-dir", os.path.join(args.out_dir, f"{codebook}-k{LARGE_K}"),
                                      "--teacher", teacher, "--seed", str(args.seed)])[0] for codebook in ("dual", "pixel")}
    text = table(results, large_k)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    print(f"\n{text}\n\nwrote {args.out_dir}/results.md ({(time.time() - start) / 60:.1f} min)")


if __name__ == "__main__":
    run_script(main, exit_codes=[(train.NonFiniteLoss, 1)])  # bad input: one line, exit code 2
