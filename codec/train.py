"""Training loop for :class:`~ncz.codec.networks.HyperpriorCodec` (library part).

One run trains every quality level at once: each *sample* of a batch draws
its own λ level, the gain units of that level scale its latent, and the loss
is the CompressAI-convention rate-distortion Lagrangian

    L = mean_b( λ_b · 255² · MSE_b + bpp_b )

(MSE on [0, 1] pixels, bpp = estimated bits of y and z per pixel). No
auxiliary loss is needed because the factorized prior has no learned
quantile offsets (see :class:`~ncz.codec.networks.EntropyBottleneck`).

Design choices (see also ``tools/train_codec.py``):

* Data: every training image is decoded once and kept in RAM as a uint8
  tensor (570 images ≈ 0.4 GB); batches are random 256x256 crops with random
  horizontal flips, drawn with a dedicated ``torch.Generator`` so that
  resuming reproduces the exact sample stream. 256 (not 128) because the
  hyper-latent z is 1/64 of the crop: at 128 it would be 2x2, i.e. pure
  border, and h_a/h_s would never see the interior statistics they meet on
  real images. The cost per pixel is the same, so we trade batch size (4)
  instead.
* Optimizer: Adam, short linear warm-up, constant ``lr`` then a ×0.1 drop at
  ``lr_drop`` · ``steps`` (the total step count). A step schedule (not
  cosine) means a run can later be *extended* by resuming with a larger
  ``steps`` without changing the learning rate of the steps already done.
* Mixed precision: the four transforms can run under bf16 autocast with
  channels-last tensors (≈2-3x faster on CPUs with AMX/AVX512-BF16); the
  entropy models always run in float32 (inside the model).
* Weight averaging: an exponential moving average (EMA) of the parameters
  is kept beside the trained ones (decay ``ema_decay``, warmed up as
  ``min(decay, (1 + n) / (10 + n))`` over its first updates) and is what
  evaluation reports and the exporter ships. Why: at a constant lr, Adam's
  iterates rattle around a minimum; their average sits nearer its floor and
  gives much of an lr drop's gain without giving up the higher lr (Polyak
  averaging; the codec lost 0.2-0.3 dB at the top level every time training
  returned from lr 1e-5 to 1e-4). Both evaluations are logged.
* Checkpoints: ``latest.pt`` (model + optimizer + step + both RNG states) is
  replaced atomically every ``ckpt_every`` steps or ``ckpt_seconds``,
  whichever comes first; a weights-only ``weights_XXXXXXXX.pt`` snapshot is
  kept every ``keep_every`` steps. In float32 on CPU, resuming gives the
  bit-identical next step.
* Evaluation: a few Kodak images (evaluation only, never trained on), every
  ``eval_every`` steps, in float32 with hard rounding: estimated bpp (sum of
  ``-log2`` likelihoods, i.e. what an ideal entropy coder pays) and PSNR of
  the 8-bit-rounded reconstruction, per quality level.

Progress is reported only through callbacks (:class:`StepReport`,
:class:`EvalReport`) and the ``train_log.jsonl`` file in the run directory;
this module prints nothing.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .architectures import build_codec
from .networks import (
    DEFAULT_LAMBDAS,
    CodecConfig,
    HyperpriorCodec,
    bits_per_pixel,
    crop,
    pad_to_multiple,
)
from .threads import ThreadTuner

__all__ = [
    "TrainConfig",
    "StepReport",
    "EvalReport",
    "LevelResult",
    "Trainer",
    "load_image",
    "load_image_folder",
    "psnr",
    "evaluate_codec",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


# --------------------------------------------------------------------------
# configuration and reports
# --------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (model architecture lives in :class:`CodecConfig`)."""

    data_dir: str = ""
    out_dir: str = "runs/codec"
    steps: int = 150_000
    batch_size: int = 4
    crop: int = 256
    lr: float = 1e-4
    lr_drop: float = 0.85          # fraction of `steps` after which lr ×= lr_drop_factor
    lr_drop_factor: float = 0.1
    warmup_steps: int = 200
    clip_grad: float = 1.0         # max global grad norm (0 = off)
    seed: int = 0
    bf16: bool = True              # autocast the transforms to bfloat16
    channels_last: bool = True
    device: str = "cpu"
    threads: int | None = None  # torch.set_num_threads (the maximum, with threads_auto)
    threads_auto: bool = False     # pick 1 or `threads` intra-op threads by measured step time
    ckpt_every: int = 500          # steps
    ckpt_seconds: float = 600.0    # ... or wall seconds, whichever first
    keep_every: int = 10_000       # keep a weights-only snapshot every this many steps (0 = never)
    eval_every: int = 2_000
    log_every: int = 50
    eval_images: tuple[str, ...] = ()
    ema_decay: float = 0.999       # exponential moving average of the weights (0 = off); exported by default
    context_lr_scale: float = 10.0  # lr multiplier of a context model's parameters (see Trainer._param_groups)
    # model architecture (used when not resuming)
    N: int = 128
    M: int = 192
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS

    def model_config(self) -> CodecConfig:
        return CodecConfig(N=self.N, M=self.M, lambdas=tuple(self.lambdas))


@dataclass
class StepReport:
    """Per-step progress (averages over the batch; samples are of mixed λ levels)."""

    step: int
    loss: float
    bpp: float
    mse: float
    psnr: float
    lr: float
    steps_per_s: float


@dataclass
class LevelResult:
    level: int
    lam: float
    bpp: float
    psnr: float


@dataclass
class EvalReport:
    """Estimated RD point per trained quality level on the evaluation images."""

    step: int
    levels: list[LevelResult] = field(default_factory=list)
    seconds: float = 0.0
    raw: EvalReport | None = None  # the non-averaged weights, when an average is kept


def psnr(mse: float, peak: float = 1.0) -> float:
    return 10.0 * math.log10(peak * peak / mse) if mse > 0 else float("inf")


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to a ``(3, H, W)`` uint8 tensor (RGB)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_image_folder(folder: str | os.PathLike, min_size: int = 0) -> list[torch.Tensor]:
    """Decode every JPEG/PNG in ``folder`` (sorted, non-recursive) to uint8 tensors.

    Images whose short side is below ``min_size`` are upscaled (bicubic) so
    that a ``min_size`` crop fits.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no .png/.jpg images in {folder}")
    out = []
    for p in files:
        t = load_image(p)
        h, w = t.shape[1:]
        if min(h, w) < min_size:
            s = min_size / min(h, w)
            with Image.open(p) as im:
                im = im.convert("RGB").resize((max(min_size, round(w * s)), max(min_size, round(h * s))), Image.BICUBIC)
                t = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        out.append(t)
    return out


def _to_float(img_u8: torch.Tensor) -> torch.Tensor:
    return img_u8.float().div_(255.0)


# --------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------


@torch.no_grad()
def evaluate_codec(model: HyperpriorCodec, images: Sequence[torch.Tensor],
                   qualities: Sequence[float] | None = None, step: int = 0) -> EvalReport:
    """Estimated bpp and PSNR per quality, averaged over ``images`` (uint8 ``(3,H,W)``).

    Runs in eval mode, float32 (autocast off), hard rounding; PSNR is of the
    reconstruction clamped and rounded to 8 bits. Restores the model's
    training flag and autocast setting afterwards.
    """
    t0 = time.time()
    was_training, ac = model.training, model.autocast_dtype
    model.eval()
    model.autocast_dtype = None
    device = next(model.parameters()).device
    if qualities is None:
        qualities = list(range(model.num_levels))
    report = EvalReport(step=step)
    try:
        for q in qualities:
            bpps, psnrs = [], []
            for img in images:
                x = _to_float(img)[None].to(device)
                xp, size = pad_to_multiple(x, model.config.pad_multiple)
                x_hat, lik = model(xp, float(q))
                x_hat = crop(x_hat, size).clamp(0, 1).mul(255).round().div(255)
                bpps.append(float(bits_per_pixel(lik, size[0] * size[1])))
                psnrs.append(psnr(float(torch.mean((x_hat - x) ** 2))))
            report.levels.append(LevelResult(level=q, lam=float(model.lambda_for(float(q))),
                                             bpp=float(np.mean(bpps)), psnr=float(np.mean(psnrs))))
    finally:
        model.train(was_training)
        model.autocast_dtype = ac
    report.seconds = time.time() - t0
    return report


# --------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------


class Trainer:
    """Owns model, optimizer, data stream and RNG state of one run.

    Args:
        cfg: run hyper-parameters.
        model_config: architecture; defaults to ``cfg.model_config()``.
        images: training images as uint8 ``(3,H,W)`` tensors; loaded from
            ``cfg.data_dir`` when omitted.
        eval_images: evaluation images (uint8); loaded from
            ``cfg.eval_images`` when omitted.
    """

    def __init__(self, cfg: TrainConfig, model_config: CodecConfig | None = None,
                 images: list[torch.Tensor] | None = None,
                 eval_images: list[torch.Tensor] | None = None):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.tuner: ThreadTuner | None = None
        if cfg.threads_auto:
            self.tuner = ThreadTuner(cfg.threads or os.cpu_count() or 1)
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.model_config = model_config or cfg.model_config()
        self.model = build_codec(self.model_config).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.autocast_dtype = torch.bfloat16 if cfg.bf16 else None
        self.model.train()
        self.optimizer = torch.optim.Adam(self._param_groups(), lr=cfg.lr)
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.images = images if images is not None else load_image_folder(cfg.data_dir, min_size=cfg.crop)
        for im in self.images:
            if min(im.shape[1:]) < cfg.crop:
                raise ValueError(f"training image {tuple(im.shape)} smaller than crop {cfg.crop}")
        if eval_images is None:
            eval_images = [load_image(p) for p in cfg.eval_images]
        self.eval_images = eval_images
        self.stop_requested = False
        self._lam = torch.tensor(self.model_config.lambdas, dtype=torch.float32)
        self.ema_model: HyperpriorCodec | None = None
        self.ema_updates = 0
        if cfg.ema_decay:
            self.reset_ema()

    def _param_groups(self) -> list[dict]:
        """The transforms and priors at ``lr``; a context model at ``lr · context_lr_scale``.

        Why: a context model added to a trained hyperprior starts from scratch while everything
        else is far along; at the shared lr it learned too slowly to pay within thousands of steps.
        """
        context = [p for n, p in self.model.named_parameters() if n.startswith("context_model.")]
        rest = [p for n, p in self.model.named_parameters() if not n.startswith("context_model.")]
        groups = [{"params": rest, "lr_scale": 1.0}]
        if context:
            groups.append({"params": context, "lr_scale": self.cfg.context_lr_scale})
        return groups

    # -- weight averaging -------------------------------------------------

    def reset_ema(self) -> None:
        """Start the average at the current weights (also after loading weights from elsewhere)."""
        if not self.cfg.ema_decay:
            return
        self.ema_model = copy.deepcopy(self.model).eval()
        for p in self.ema_model.parameters():
            p.requires_grad_(False)
        self.ema_updates = 0

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema_model is None:
            return
        decay = min(self.cfg.ema_decay, (1 + self.ema_updates) / (10 + self.ema_updates))
        ema = list(self.ema_model.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in self.model.parameters()], 1.0 - decay)
        for e, b in zip(self.ema_model.buffers(), self.model.buffers()):
            e.copy_(b)
        self.ema_updates += 1

    @property
    def export_model(self) -> HyperpriorCodec:
        """The weights to ship: the moving average when kept, else the trained weights."""
        return self.ema_model if self.ema_model is not None else self.model

    # -- schedule ---------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """Learning rate used for the update that produces step ``step + 1``."""
        c = self.cfg
        lr = c.lr
        if step >= int(c.lr_drop * c.steps):
            lr *= c.lr_drop_factor
        if c.warmup_steps and step < c.warmup_steps:
            lr *= (step + 1) / c.warmup_steps
        return lr

    # -- data -------------------------------------------------------------

    def sample_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Random crops (with random h-flip) and per-sample quality levels."""
        c, g = self.cfg, self.data_gen
        n = len(self.images)
        idx = torch.randint(n, (c.batch_size,), generator=g).tolist()
        crops = []
        for i in idx:
            im = self.images[i]
            H, W = im.shape[1:]
            top = int(torch.randint(H - c.crop + 1, (1,), generator=g))
            left = int(torch.randint(W - c.crop + 1, (1,), generator=g))
            patch = im[:, top:top + c.crop, left:left + c.crop]
            if bool(torch.rand((), generator=g) < 0.5):
                patch = patch.flip(-1)
            crops.append(patch)
        x = _to_float(torch.stack(crops))
        levels = torch.randint(self.model_config.num_levels, (c.batch_size,), generator=g)
        return x, levels

    # -- one step ---------------------------------------------------------

    def train_step(self) -> dict[str, object]:
        """One optimizer step; returns batch-mean metrics and per-sample ones."""
        x, levels = self.sample_batch()
        x = x.to(self.device)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = self.lr_at(self.step)
        for grp in self.optimizer.param_groups:
            grp["lr"] = lr * grp.get("lr_scale", 1.0)
        lam = self._lam[levels].to(self.device)
        q = levels.to(self.device, torch.float32)

        x_hat, lik = self.model(x, q)
        num_pixels = x.shape[2] * x.shape[3]
        bpp = bits_per_pixel(lik, num_pixels, per_sample=True)
        mse = ((x_hat.float() - x) ** 2).flatten(1).mean(1)
        loss = (lam * (255.0 ** 2) * mse + bpp).mean()

        self.optimizer.zero_grad(set_to_none=True)
        skipped = not bool(torch.isfinite(loss))
        if not skipped:
            loss.backward()
            if self.cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
            self.optimizer.step()
            self._update_ema()
        self.step += 1
        mse_d, bpp_d = mse.detach().cpu(), bpp.detach().cpu()
        m = float(mse_d.mean())
        return {
            "loss": float(loss.detach()), "bpp": float(bpp_d.mean()), "mse": m, "psnr": psnr(m),
            "lr": lr, "levels": levels.tolist(), "sample_bpp": bpp_d.tolist(),
            "sample_mse": mse_d.tolist(), "skipped": skipped,
        }

    # -- checkpoints ------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "format": "ncz-codec-train/v1",
            "step": self.step,
            "model_config": self.model_config.to_dict(),
            "train_config": asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "rng_data": self.data_gen.get_state(),
            "ema": self.ema_model.state_dict() if self.ema_model is not None else None,
            "ema_updates": self.ema_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        mc = CodecConfig.from_dict(state["model_config"])
        if mc != self.model_config:
            raise ValueError(f"checkpoint architecture {mc} != trainer's {self.model_config}")
        self.model.load_state_dict(state["model"])
        optimizer = state.get("optimizer")
        if optimizer is not None and len(optimizer["param_groups"]) == len(self.optimizer.param_groups):
            self.optimizer.load_state_dict(optimizer)
            for group, saved in zip(self.optimizer.param_groups, self._param_groups()):
                group["lr_scale"] = saved["lr_scale"]  # the command line's, not the checkpoint's
        # else: after an architecture change, or from before parameter groups: a fresh Adam
        self.step = int(state["step"])
        torch.set_rng_state(state["rng_torch"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.data_gen.set_state(state["rng_data"])
        self.reset_ema()  # a checkpoint from before averaging existed starts its average here
        if self.ema_model is not None and state.get("ema") is not None:
            self.ema_model.load_state_dict(state["ema"])
            self.ema_updates = int(state.get("ema_updates", 0))

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Atomically write the full training state (default ``out_dir/latest.pt``)."""
        out = Path(self.cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = Path(path) if path is not None else out / "latest.pt"
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def save_weights(self, path: str | os.PathLike) -> Path:
        """Weights-only snapshot: ``{"model_config", "model", "step", "ema"}``.

        ``model`` holds the weights to ship (:attr:`export_model`); ``ema``
        says whether they are the moving average.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": "ncz-codec-weights/v1", "step": self.step,
                    "model_config": self.model_config.to_dict(),
                    "model": self.export_model.state_dict(), "ema": self.ema_model is not None}, tmp)
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.load_state_dict(state)

    @staticmethod
    def read_model_config(path: str | os.PathLike) -> CodecConfig:
        """Architecture recorded in a checkpoint or weights snapshot."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        return CodecConfig.from_dict(state["model_config"])

    # -- evaluation -------------------------------------------------------

    def evaluate(self) -> EvalReport:
        """Evaluation of the weights that would ship (the moving average when kept)."""
        return evaluate_codec(self.export_model, self.eval_images, step=self.step)

    # -- main loop --------------------------------------------------------

    def _log(self, record: dict) -> None:
        out = Path(self.cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {"time": round(time.time(), 3), **record}
        with open(out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def train(self, on_step: Callable[[StepReport], None] | None = None,
              on_eval: Callable[[EvalReport], None] | None = None,
              on_checkpoint: Callable[[int, Path], None] | None = None,
              max_steps: int | None = None, eval_at_start: bool = False) -> int:
        """Run until ``cfg.steps`` (or ``max_steps`` more steps, or :attr:`stop_requested`).

        Writes ``train_log.jsonl`` and checkpoints into ``cfg.out_dir``; the
        final state is always checkpointed. Returns the step reached.
        """
        c = self.cfg
        end = c.steps if max_steps is None else min(c.steps, self.step + max_steps)
        self._log({"event": "start", "step": self.step, "train_config": asdict(c),
                   "model_config": self.model_config.to_dict(),
                   "threads": torch.get_num_threads(), "device": str(self.device)})
        if eval_at_start and self.eval_images:
            self._do_eval(on_eval)
        last_ckpt_t = time.time()
        last_ckpt_step = -1
        window: list[dict] = []
        rate_t, rate_n, sps = time.time(), 0, 0.0
        while self.step < end and not self.stop_requested:
            t_step = time.time()
            r = self.train_step()
            if self.tuner is not None:
                decision = self.tuner.record(time.time() - t_step)
                if decision is not None:
                    self._log({"step": self.step, **decision})
            window.append(r)
            rate_n += 1
            dt = time.time() - rate_t
            if dt >= 5.0 or sps == 0.0:
                sps = rate_n / max(dt, 1e-9)
                if dt >= 5.0:
                    rate_t, rate_n = time.time(), 0
            if on_step is not None:
                on_step(StepReport(step=self.step, loss=r["loss"], bpp=r["bpp"], mse=r["mse"],
                                   psnr=r["psnr"], lr=r["lr"], steps_per_s=sps))
            if c.log_every and self.step % c.log_every == 0:
                self._log(self._summarize(window, sps))
                window = []
            if c.eval_every and self.step % c.eval_every == 0 and self.eval_images:
                self._do_eval(on_eval)
            if c.keep_every and self.step % c.keep_every == 0:
                self.save_weights(Path(c.out_dir) / f"weights_{self.step:08d}.pt")
            if (c.ckpt_every and self.step % c.ckpt_every == 0) or time.time() - last_ckpt_t >= c.ckpt_seconds:
                p = self.save_checkpoint()
                last_ckpt_t, last_ckpt_step = time.time(), self.step
                self._log({"event": "checkpoint", "step": self.step, "path": str(p)})
                if on_checkpoint is not None:
                    on_checkpoint(self.step, p)
        if window:
            self._log(self._summarize(window, sps))
        if last_ckpt_step != self.step:
            p = self.save_checkpoint()
            self._log({"event": "checkpoint", "step": self.step, "path": str(p),
                       "reason": "stop" if self.stop_requested else "end"})
            if on_checkpoint is not None:
                on_checkpoint(self.step, p)
        return self.step

    def _do_eval(self, on_eval) -> EvalReport:
        rep = self.evaluate()
        record = {"event": "eval", "step": rep.step, "seconds": round(rep.seconds, 2),
                  "ema": self.ema_model is not None, "levels": [asdict(level) for level in rep.levels]}
        if self.ema_model is not None:  # the raw iterate too, so the average's gain stays visible
            raw = evaluate_codec(self.model, self.eval_images, step=self.step)
            record["raw_levels"] = [asdict(level) for level in raw.levels]
            rep.raw = raw
        self._log(record)
        if on_eval is not None:
            on_eval(rep)
        return rep

    def _summarize(self, window: list[dict], sps: float) -> dict:
        n = len(window)
        per_level: dict[int, list[tuple[float, float]]] = {}
        for r in window:
            for lv, b, m in zip(r["levels"], r["sample_bpp"], r["sample_mse"]):
                per_level.setdefault(lv, []).append((b, m))
        mse = sum(r["mse"] for r in window) / n
        return {
            "event": "train", "step": self.step, "steps": n,
            "loss": sum(r["loss"] for r in window) / n,
            "bpp": sum(r["bpp"] for r in window) / n,
            "mse": mse, "psnr": psnr(mse), "lr": window[-1]["lr"],
            "steps_per_s": sps, "threads": torch.get_num_threads(), "skipped": sum(bool(r["skipped"]) for r in window),
            "per_level": {str(lv): {"n": len(v), "bpp": sum(b for b, _ in v) / len(v),
                                    "psnr": psnr(sum(m for _, m in v) / len(v))}
                          for lv, v in sorted(per_level.items())},
        }
