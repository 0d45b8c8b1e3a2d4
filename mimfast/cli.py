"""``mimfast`` command line. ``mimfast demo``: quantize a built-in batch, print speed and codebook usage.
``mimfast pretrain``: masked-image-modeling pretraining (:mod:`mimfast.train`), e.g.
``mimfast pretrain --config mae_debug train.epochs=3 optim.blr=1e-4``.

The demo needs no download: it draws a seeded Gaussian-mixture batch (the kind of clustered features a VQ tokenizer
sees), times ``mimfast.vq_search`` against the eager PyTorch search most VQ code uses, then trains an EMA
``mimfast.VectorQuantizer`` with k-means init and dead-code restart for a few steps, printing usage as it goes.

Every subcommand takes its options and ``key=value`` overrides in any order (intermixed parsing). Errors follow one
policy (:func:`main`): a user mistake (config, data, checkpoint, paths, arguments) is one ``error:`` line on stderr
and exit status 2; a non-finite loss under ``nan_policy=stop`` exits 1; a run stopped by SIGTERM / SIGINT / SIGUSR1
after its final checkpoint exits 128 + the signal number; anything else is reported as an internal error (exit 1).
``--debug`` (any subcommand) or ``MIMFAST_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings

from . import __version__


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .train import get_config, list_configs
    from .train.config import print_config

    if args.list_configs:
        print("\n".join(list_configs()))
        return 0
    overrides = list(args.overrides)
    if args.out is not None:
        overrides.append(f"train.out_dir={args.out}")
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    cfg = get_config(args.config, overrides)
    if args.print_config:
        print_config(cfg, f"mimfast pretrain --config {args.config}")
        return 0
    from .train import pretrain

    pretrain(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``mimfast`` parser; ``parser.subcommands`` maps each subcommand to its own parser."""
    p = argparse.ArgumentParser(prog="mimfast", description="mimfast: fast masked image modeling and VQ kernels")
    p.add_argument("--version", action="version", version=f"mimfast {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors (MIMFAST_DEBUG=1)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error (or MIMFAST_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    from .demo import cmd_demo

    d = sub.add_parser(
        "demo",
        parents=[common],
        help="quantize a built-in batch with mimfast.quantize; print speed and codebook usage; compare the quantizers",
    )
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    d.add_argument("--n", type=int, default=0, help="vectors in the batch (default 65536 on CUDA, 16384 on CPU)")
    d.add_argument("--dim", type=int, default=64, help="feature size D")
    d.add_argument("--codebook-size", type=int, default=1024, help="codes K")
    d.add_argument("--clusters", type=int, default=512, help="mixture components of the synthetic data")
    d.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    d.add_argument("--steps", type=int, default=20, help="EMA training steps")
    d.add_argument("--batch", type=int, default=4096, help="vectors per training step")
    d.add_argument("--reps", type=int, default=5, help="timed repetitions of each search")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--compare-steps", type=int, default=300,
                   help="steps of the quantizer comparison (VQ / Gumbel / Regularized VQ); 0 skips it")  # fmt: skip
    d.set_defaults(func=cmd_demo)
    t = sub.add_parser(
        "pretrain",
        parents=[common],
        help="masked image modeling pretraining (single process, or one rank under torchrun)",
        description="Pretrain from a named config with dotted key=value overrides, e.g. "
        "`mimfast pretrain --config mae_debug train.epochs=3 optim.blr=1e-4 data.root=/data/imagenet`. "
        "Multi-GPU: `torchrun --nproc_per_node 8 -m mimfast.cli pretrain --config mae_vit_base ...`. Options and "
        "overrides may come in any order. SIGTERM / SIGINT / SIGUSR1 write a checkpoint at the next step and stop "
        "(exit 128 + signal); a second one exits at once.",
    )
    t.add_argument("--config", default="mae_debug", help="preset name (see --list-configs; default mae_debug)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=3 optim.blr=1e-4 out=DIR")
    t.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint in out_dir) or a checkpoint path")
    t.add_argument("--out", default=None, help="run directory (same as train.out_dir=...)")
    t.add_argument("--print-config", action="store_true", help="print every key with its value and meaning; exit")
    t.add_argument("--list-configs", action="store_true", help="list the presets and exit")
    t.set_defaults(func=cmd_pretrain)
    from .train.finetune import add_finetune_arguments, cmd_finetune

    ft = sub.add_parser(
        "finetune",
        parents=[common],
        help="fine-tune a pretrained encoder as a classifier (val top-1 / top-5 each epoch, best.pt kept)",
        description="Fine-tune from a pretraining run, e.g. `mimfast finetune --checkpoint runs/mae_debug` (the preset "
        "follows the checkpoint's) or `mimfast finetune --config mae_finetune_vit_base --checkpoint runs/mae_vit_base "
        "data.root=/data/imagenet`; same launcher, overrides, resume and signals as pretrain. `--eval-only` evaluates "
        "a fine-tuned checkpoint (a run, best.pt, or an official .pth).",
    )
    add_finetune_arguments(ft)
    ft.set_defaults(func=cmd_finetune)
    from .data.validate import add_validate_arguments, cmd_validate
    from .train.evaluate import add_probe_arguments, add_reconstruct_arguments, cmd_probe, cmd_reconstruct

    v = sub.add_parser(
        "validate-data",
        parents=[common],
        help="find corrupt or unreadable images (which abort DALI mid-epoch) in a folder or webdataset tree",
    )
    add_validate_arguments(v)
    v.set_defaults(func=cmd_validate)
    pr = sub.add_parser(
        "probe",
        parents=[common],
        help="linear probe (top-1) of a pretrained encoder on a labelled dataset (the built-in one by default)",
    )
    add_probe_arguments(pr)
    pr.set_defaults(func=cmd_probe)
    from .train.knn import add_knn_arguments, cmd_knn

    kn = sub.add_parser("knn", parents=[common], help="weighted k-NN (DINO's) top-1 / top-5 of a frozen encoder")
    add_knn_arguments(kn)
    kn.set_defaults(func=cmd_knn)
    from .train.tokenizer_eval import add_evaluate_tokenizer_arguments, cmd_evaluate_tokenizer

    et = sub.add_parser(
        "evaluate-tokenizer",
        parents=[common],
        help="reconstruction L1 and codebook use of a tokenizer on its val split (vs its init)",
    )
    add_evaluate_tokenizer_arguments(et)
    et.set_defaults(func=cmd_evaluate_tokenizer)
    rc = sub.add_parser("reconstruct", parents=[common],
                        help="write a PNG grid of MAE inputs / masked inputs / reconstructions")  # fmt: skip
    add_reconstruct_arguments(rc)
    rc.set_defaults(func=cmd_reconstruct)
    from .train.generate import add_generate_arguments, cmd_generate

    gn = sub.add_parser("generate", parents=[common],
                        help="images from a MAGE run by MaskGIT decoding on the device, as a PNG grid")  # fmt: skip
    add_generate_arguments(gn)
    gn.set_defaults(func=cmd_generate)
    inf = sub.add_parser("info", parents=[common], help="print the version and which backends (Triton, native CPU) run")
    inf.set_defaults(func=lambda args: print(__import__("mimfast.kernels._native").kernels._native.describe()) or 0)
    p.subcommands = dict(sub.choices)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with intermixed options and positionals on every subcommand (argparse alone stops collecting
    ``key=value`` overrides at the first option: ``pretrain --out x train.epochs=3`` would be rejected)."""
    parser = build_parser()
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-h", "--help", "--version"):
        i += 1  # top-level flags before the subcommand (--debug)
    if i >= len(argv) or argv[i] not in parser.subcommands:
        return parser.parse_args(argv)  # help, version, or argparse's own error for a missing / unknown command
    args = parser.subcommands[argv[i]].parse_intermixed_args(argv[i + 1 :])
    args.command = argv[i]
    args.debug = args.debug or "--debug" in argv[:i]
    return args


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def _resume_hint(argv: list[str]) -> str:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "rerun the same torchrun command with --resume auto"
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith(("--resume=", "resume=", "train.resume=")):
            keep.append(a)
    return f"resume with: mimfast {shlex.join(keep)} --resume auto"


def main(argv: list[str] | None = None) -> int:
    """Run one ``mimfast`` subcommand; returns the exit status (see the module docstring for the error policy)."""
    from .data import DataError
    from .train import CheckpointError, ConfigError, NonFiniteLossError, TrainingInterrupted

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    debug = args.debug or os.environ.get("MIMFAST_DEBUG", "").lower() not in ("", "0", "false", "no")
    for name in ("n", "dim", "codebook_size", "clusters", "steps", "batch", "reps", "compare_steps"):
        v = getattr(args, name, None)
        low = 0 if name in ("n", "compare_steps") else 1
        if args.command == "demo" and v is not None and v < low:
            print(f"error: --{name.replace('_', '-')} must be >= {low}, got {v}", file=sys.stderr)
            return 2
    user_errors = (ConfigError, CheckpointError, DataError, ValueError, FileNotFoundError, NotADirectoryError,
                   IsADirectoryError, PermissionError, ImportError)  # fmt: skip
    with warnings.catch_warnings():
        if not debug:  # warnings as one line each, not file:line + source
            warnings.showwarning = lambda msg, cat, *a, **k: print(f"warning: {_one_line(msg)}", file=sys.stderr)
        try:
            return args.func(args)
        except TrainingInterrupted as e:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"{e.summary}; {_resume_hint(argv)}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            if debug:
                raise
            print("error: interrupted (SIGINT)", file=sys.stderr)
            return 130
        except NonFiniteLossError as e:
            if debug:
                raise
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 1
        except user_errors as e:
            if debug:
                raise
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
        except Exception as e:
            if debug:
                raise
            print(f"error: internal error, {type(e).__name__}: {_one_line(e)} (rerun with --debug or MIMFAST_DEBUG=1 "
                  "for the traceback, and please report it)", file=sys.stderr)  # fmt: skip
            return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
