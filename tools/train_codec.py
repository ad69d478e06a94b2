"""Train the ncz learned image codec: ``python -m ncz.tools.train_codec``.

One run trains all quality levels (gain units, one λ per level; see
``ncz.codec.networks``). Typical long CPU run, resumable at any time::

    mkdir -p runs/codec
    nice -n 10 nohup python -m ncz.tools.train_codec --out runs/codec \\
        --steps 150000 --threads auto:2 > runs/codec/stdout.log 2>&1 &
    # later, after an interruption (same command plus --resume):
    python -m ncz.tools.train_codec --out runs/codec --steps 150000 --threads auto:2 --resume

``--resume`` continues from ``OUT/latest.pt`` (or the file given with
``--resume-from``): same weights, optimizer moments, step, data stream and
noise RNG. The architecture comes from the checkpoint; the schedule options
(``--steps``, ``--lr``...) come from the command line, so a run can be
extended by resuming with a larger ``--steps``.

SIGTERM / SIGINT (Ctrl-C) finish the current step, write a checkpoint and
exit cleanly.

Outputs in ``OUT``: ``latest.pt`` (full state), ``weights_XXXXXXXX.pt``
(weights-only snapshots), ``train_log.jsonl`` (one JSON record per log
window / evaluation / checkpoint) and ``curves.png`` (its curves, rewritten
after every evaluation: ``ncz.tools.train_curves``; needs matplotlib).
"""
from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ncz.codec.architectures import CHECKERBOARD_ARCH
from ncz.codec.growth import add_checkerboard_context, add_levels
from ncz.codec.networks import DEFAULT_LAMBDAS, CodecConfig
from ncz.codec.train import EvalReport, StepReport, TrainConfig, Trainer
from ncz.tools.train_curves import plot_curves, read_log


def _default_data_root() -> Path:
    # tools/ is mapped to ncz.tools; in an editable checkout the repo root is
    # its parent and shared/ sits beside the repo.
    here = Path(__file__).resolve().parent.parent
    for cand in (here / ".." / "shared" / "data", Path.cwd() / ".." / "shared" / "data",
                 Path.cwd() / "shared" / "data"):
        if cand.is_dir():
            return cand.resolve()
    return (Path.cwd() / ".." / "shared" / "data")


def build_parser() -> argparse.ArgumentParser:
    data = _default_data_root()
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m ncz.tools.train_codec",
                                description="Train the variable-rate mean-scale hyperprior codec.")
    p.add_argument("--data", default=str(data / "train_images"), help="folder of training JPEG/PNG images")
    p.add_argument("--eval-images", nargs="*",
                   default=[str(data / "kodak" / f"kodim{i:02d}.png") for i in (1, 7, 23)],
                   help="evaluation images (Kodak: evaluation only, never trained on)")
    p.add_argument("--out", default="runs/codec", help="run directory (checkpoints, train_log.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest.pt")
    p.add_argument("--resume-from", default=None, help="continue from this checkpoint file")
    p.add_argument("--add-lambdas", type=float, nargs="+", default=None, metavar="λ",
                   help="with --resume: add these λ levels to the checkpoint's model (gain rows extrapolated "
                        "from the nearest trained levels; everything else kept)")
    p.add_argument("--checkerboard", action="store_true",
                   help="with --resume/--init-from of a hyperprior: add a checkerboard context model (starts as the "
                        "same function; fresh optimizer); new runs: train the checkerboard architecture")
    p.add_argument("--init-from", nargs="+", default=None, metavar="WEIGHTS.ncz",
                   help="start from shipped weights instead of a checkpoint: codec/weights/default.ncz "
                        "codec/weights/train-state.ncz (fresh optimizer; the step count comes from the header)")
    p.add_argument("--steps", type=int, default=d.steps, help="total steps (the lr drop is tied to it)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--crop", type=int, default=d.crop, help="square training crop size (multiple of 64)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-drop", type=float, default=d.lr_drop,
                   help="fraction of --steps after which lr ×= --lr-drop-factor")
    p.add_argument("--lr-drop-factor", type=float, default=d.lr_drop_factor)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--clip-grad", type=float, default=d.clip_grad)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--N", type=int, default=d.N, help="hidden channels (new runs only)")
    p.add_argument("--M", type=int, default=d.M, help="latent channels (new runs only)")
    p.add_argument("--lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDAS),
                   help="ascending λ list, one per quality level (new runs only)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=d.bf16,
                   help="bf16 autocast of the transforms (entropy models stay fp32)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=d.channels_last)
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--threads", default=None,
                   help="torch.set_num_threads; 'auto' or 'auto:N' switches between 1 and N (default: all cores) "
                        "threads by measured step time (best on a shared, oversubscribed CPU)")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="checkpoint every N steps")
    p.add_argument("--ckpt-minutes", type=float, default=d.ckpt_seconds / 60, help="... or every this many minutes")
    p.add_argument("--keep-every", type=int, default=d.keep_every, help="weights-only snapshot every N steps")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in this invocation")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="decay of the moving average of the weights that evaluation reports and export ships (0 = off)")
    p.add_argument("--context-lr-scale", type=float, default=d.context_lr_scale,
                   help="lr multiplier of the checkerboard context's parameters (it starts from scratch)")
    p.add_argument("--eval-at-start", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def _fmt_eval(rep: EvalReport) -> str:
    def levels(r: EvalReport) -> str:
        return " | ".join(f"q{lv.level}: {lv.bpp:.3f} bpp {lv.psnr:.2f} dB" for lv in r.levels)
    text = f"[eval step {rep.step}, {rep.seconds:.0f}s{', EMA' if rep.raw else ''}] " + levels(rep)
    return text + (f"\n[eval step {rep.step}, raw] " + levels(rep.raw) if rep.raw else "")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads_auto = str(args.threads).startswith("auto")
    if threads_auto:
        threads = int(args.threads.split(":", 1)[1]) if ":" in args.threads else None
    else:
        threads = int(args.threads) if args.threads is not None else None
    cfg = TrainConfig(
        data_dir=args.data, out_dir=args.out, steps=args.steps, batch_size=args.batch_size,
        crop=args.crop, lr=args.lr, lr_drop=args.lr_drop, lr_drop_factor=args.lr_drop_factor,
        warmup_steps=args.warmup_steps, clip_grad=args.clip_grad, seed=args.seed,
        bf16=args.bf16, channels_last=args.channels_last, device=device, threads=threads, threads_auto=threads_auto,
        ckpt_every=args.ckpt_every, ckpt_seconds=args.ckpt_minutes * 60, keep_every=args.keep_every,
        eval_every=args.eval_every, log_every=args.log_every, eval_images=tuple(args.eval_images),
        N=args.N, M=args.M, lambdas=tuple(args.lambdas), ema_decay=args.ema_decay,
        context_lr_scale=args.context_lr_scale,
    )
    if not 0.0 <= cfg.ema_decay < 1.0:
        print("error: --ema-decay must be in [0, 1)", file=sys.stderr)
        return 2
    resume_path = (Path(args.resume_from) if args.resume_from
                   else Path(args.out) / "latest.pt" if args.resume else None)
    model_config, resume_state = None, None
    if args.add_lambdas and resume_path is None:
        print("error: --add-lambdas needs --resume or --resume-from", file=sys.stderr)
        return 2
    if resume_path is not None:
        if not resume_path.exists():
            print(f"error: no checkpoint at {resume_path}", file=sys.stderr)
            return 2
        resume_state = torch.load(resume_path, map_location=device, weights_only=True)
        if args.add_lambdas:
            resume_state = add_levels(resume_state, args.add_lambdas)
        if args.checkerboard:
            resume_state = add_checkerboard_context(resume_state, seed=args.seed)
        model_config = CodecConfig.from_dict(resume_state["model_config"])
    elif args.init_from:
        # The shipped weights fix the architecture and the λ levels; --N/--M/--lambdas do not apply.
        from ncz.format import open as open_archive

        with open_archive(args.init_from[0]) as reader:
            model_config = CodecConfig.from_dict(reader.metadata["codec"])
        if args.checkerboard:
            model_config = replace(model_config, arch=CHECKERBOARD_ARCH)
    elif args.checkerboard:
        model_config = replace(cfg.model_config(), arch=CHECKERBOARD_ARCH)

    print(f"loading images from {cfg.data_dir} ...", flush=True)
    trainer = Trainer(cfg, model_config=model_config)
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
        del resume_state
        print(f"resumed from {resume_path} at step {trainer.step}", flush=True)
    elif args.init_from:
        from ncz.codec.weights import float_state

        state, step = float_state(*args.init_from)
        result = trainer.model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not (args.checkerboard and k.startswith("context_model."))]
        if missing:
            print(f"error: --init-from lacks {len(missing)} tensors, e.g. {missing[:3]}",
                  file=sys.stderr)
            return 2
        trainer.step = step
        trainer.reset_ema()
        print(f"initialised from {', '.join(args.init_from)} at step {step} (fresh optimizer)", flush=True)
    mc = trainer.model_config
    print(f"{len(trainer.images)} training images, {len(trainer.eval_images)} eval images; "
          f"N={mc.N} M={mc.M} levels={len(mc.lambdas)} λ={list(mc.lambdas)}; device={device} "
          f"threads={'auto:' if threads_auto else ''}"
          f"{torch.get_num_threads() if not threads_auto else (threads or 'all')} "
          f"bf16={cfg.bf16} channels_last={cfg.channels_last}", flush=True)

    def _stop(signum, frame):
        trainer.stop_requested = True
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=trainer.step, dynamic_ncols=True, mininterval=2.0)

    def on_step(r: StepReport):
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{r.loss:.3f}", bpp=f"{r.bpp:.3f}", psnr=f"{r.psnr:.2f}",
                            lr=f"{r.lr:.1e}", sps=f"{r.steps_per_s:.2f}", thr=torch.get_num_threads(),
                            refresh=False)

    def write(msg: str):
        (bar.write if bar is not None else print)(msg)
        sys.stdout.flush()

    curves = Path(cfg.out_dir) / "curves.png"
    plotting = [True]

    def on_eval(rep: EvalReport):
        write(_fmt_eval(rep))
        if plotting[0]:  # the run's curves as a PNG beside its log (needs matplotlib, the bench extra)
            try:
                plot_curves(read_log(Path(cfg.out_dir) / "train_log.jsonl"), curves, title=f"{cfg.out_dir}")
            except ImportError:
                plotting[0] = False
                write(f"[curves] {curves} not written: matplotlib is not installed (pip install -e '.[bench]')")
            except Exception as exc:  # a plot must never stop a training run
                write(f"[curves] {curves} not written: {type(exc).__name__}: {exc}")

    def on_ckpt(step: int, path: Path):
        write(f"[checkpoint step {step}] {path}")

    step = trainer.train(on_step=on_step, on_eval=on_eval, on_checkpoint=on_ckpt,
                         max_steps=args.max_steps, eval_at_start=args.eval_at_start)
    if bar is not None:
        bar.close()
    print(f"stopped at step {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
