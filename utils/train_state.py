"""
A training run's state: what train.py's loop carries from step to step besides the batches and
keeps in its checkpoint beside the model (optimiser, gradient scaler, random state, EMA weights), so
that --resume continues the run exactly; and what a non-finite step or a signal (SIGINT, SIGTERM)
does to the run and its checkpoint.
"""

import os
import signal
import threading

import torch

from utils.checkpoints import config_diff, config_from_dict, load_checkpoint, matching_weights
from utils.distributed import barrier


class EMA:
    """Weights averaged over steps (as VAR and LlamaGen): w_ema <- d w_ema + (1 - d) w, with d warmed up
    as min(decay, (1+t)/(10+t)) so short runs do not sit at the init. Evaluation and sampling use it."""

    def __init__(self, model, decay):
        self.decay, self.weights = decay, {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model, step):
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.weights[k].lerp_(v, 1 - d)
            else:
                self.weights[k].copy_(v)  # integer buffers (counters) are copied


class TrainState:
    """What a training loop carries from step to step besides the batches: the model, its optimiser,
    the gradient scaler, the EMA (or None) and the random state; and its checkpoint file, path,
    written by save(step) through save_fn(step, state()) on rank 0 (main) and read back by resume().
    log(text) reports."""

    def __init__(self, model, opt, scaler, ema, device, path, save_fn, main=True, log=print):
        self.model, self.opt, self.scaler, self.ema, self.device = model, opt, scaler, ema, device
        self.path, self.save_fn, self.main, self.log = path, save_fn, main, log
        self.saved = None  # the step the checkpoint file holds

    def save(self, step, faults=None):
        """Write the checkpoint (rank 0); every rank waits, as the next stage reads the file. After a
        non-finite step (faults.in_a_row) the last good checkpoint stays as it is. -> what is on disk."""
        if faults is not None and faults.in_a_row:
            return self.where()
        if self.main:
            self.save_fn(step, self.state())
        self.saved = step
        barrier()
        return f"checkpoint written to {self.path}"

    def where(self):
        return f"{self.path} holds step {self.saved}" if self.saved is not None else "no checkpoint was written yet"

    def state(self):
        cuda_rng = {"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.startswith("cuda") else {}
        return {"optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "rng": torch.get_rng_state(),
                **cuda_rng, **({"ema": self.ema.weights} if self.ema else {})}

    def evaluate(self, eval_fn):
        """eval_fn() with the EMA weights (if any) in the model, as sampling sees it."""
        if self.ema is None:
            return eval_fn()
        raw = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.ema.weights)
        try:
            return eval_fn()
        finally:
            self.model.load_state_dict(raw)

    def resume(self, stage):
        """Load the stage's checkpoint into the model and this state -> the step to continue from
        (0 if there is no file yet)."""
        path = self.path
        if not os.path.exists(path):
            self.log(f"{stage}: --resume given but there is no {path}; starting from step 0")
            return 0
        ckpt = load_checkpoint(path, "tokenizer" if stage == "decoder" else stage)  # (decoder.pt holds a tokenizer)
        diff = config_diff(config_from_dict(type(self.model.cfg), ckpt["config"]), self.model.cfg)
        if diff:
            raise ValueError(f"cannot resume from {path}: checkpoint vs this run differ in "
                             f"{'; '.join(diff)}; use the flags it was trained with or another --out-dir")
        if "optimizer" not in ckpt:
            raise ValueError(f"cannot resume from {path}: it holds no optimiser state; drop --resume or use another "
                             "--out-dir")
        self.model.load_state_dict(matching_weights(self.model, ckpt["model"], path))
        self.opt.load_state_dict(ckpt["optimizer"])
        for p, state in self.opt.state.items():  # fused AdamW needs its moments in the weights' layout (channels_last)
            state.update({k: torch.empty_like(p).copy_(v) for k, v in state.items() if k != "step"})
        if ckpt.get("scaler"):  # empty when the run that saved it had no scaler (fp32, bf16)
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            ema = matching_weights(self.model, ckpt.get("ema", ckpt["model"]), f"{path} (EMA)")
            self.ema.weights = {k: v.to(self.device) for k, v in ema.items()}
        if "rng" in ckpt:  # scale drop, class drop and augmentation continue as if never stopped
            torch.set_rng_state(ckpt["rng"])
        if "cuda_rng" in ckpt and self.device.startswith("cuda"):
            torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
        self.log(f"{stage}: resumed from {path} at step {ckpt['step']}")
        self.saved = ckpt["step"]
        return ckpt["step"]


class NonFiniteLoss(RuntimeError):
    pass


class BadSteps:
    """Steps skipped for a non-finite loss or gradient: counted, and 10 in a row stop the run
    without saving (the last good checkpoint stays as it was; where() says which)."""

    def __init__(self, stage, log):
        self.stage, self.log, self.total, self.in_a_row = stage, log, 0, 0

    def ok(self):
        self.in_a_row = 0

    def skip(self, step, where):
        self.total, self.in_a_row = self.total + 1, self.in_a_row + 1
        self.log(f"{self.stage}: step {step}: non-finite loss or gradient, step skipped ({self.total} so far)")
        if self.in_a_row == 10:
            raise NonFiniteLoss(f"{self.stage}: 10 non-finite losses in a row (steps {step - 9}-{step}); stopped "
                                f"without saving; {where}. Lower --lr or check the data, then --resume")


class Interrupt:
    """Within the block, SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop) are remembered rather than
    acted on at once, so the training loop can finish the step, write a checkpoint and exit
    (exit_after_signal)."""

    def __enter__(self):
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self.previous = {s: signal.signal(s, self.remember) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def remember(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now, the usual way
            self.restore()
            signal.raise_signal(signum)
        self.signal = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def exit_after_signal(self, stage, step, written, log):
        """After the step in which any rank got a signal, and its checkpoint (written: what is on
        disk now): one line, then exit 128 + signal, as the signal itself would."""
        signum, self.signal = self.signal or signal.SIGTERM, None  # (SIGTERM: another rank's)
        log(f"{stage}: {signal.Signals(signum).name} at step {step}: {written}; "
            "run the same command with --resume to continue")
        raise SystemExit(128 + signum)

    def __exit__(self, *exc):
        self.restore()
        if self.signal is not None and exc[0] is None:  # arrived after the last step's check: act on it now
            signal.raise_signal(self.signal)
