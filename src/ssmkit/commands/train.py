"""``ssmkit train --config FILE.yaml [key=value ...]``: train a model (also under ``torchrun``).

``--resume auto|FOLDER`` and ``--golden`` are shortcuts for ``checkpoint.resume=...`` and
``checkpoint.golden=final``; ``--bench`` runs the training throughput benchmark instead
(see :mod:`ssmkit.training.bench`).
"""

from __future__ import annotations

import argparse
import logging
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model from a YAML config (torchrun for several GPUs)"
    )
    parser.add_argument("--config", default=None, help="YAML training config (defaults apply when omitted)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. optim.lr=1e-3 data.seq_len=512 model.preset=mamba2-130m",
    )
    parser.add_argument(
        "--resume", default=None, help="'auto' (newest good checkpoint of out_dir) or a folder"
    )
    parser.add_argument("--golden", action="store_true", help="keep the final checkpoint as the golden one")
    parser.add_argument(
        "--bench",
        action="store_true",
        help="benchmark training tokens/s and MFU of presets against a same-size Transformer",
    )
    parser.add_argument("--presets", default="mamba-130m,mamba2-130m", help="--bench: presets to compare")
    parser.add_argument("--seqlen", default="2048", help="--bench: comma-separated sequence lengths")
    parser.add_argument("--steps", type=int, default=20, help="--bench: timed steps per model (after warmup)")
    parser.add_argument("--json", default=None, help="--bench: write the results to this file")
    parser.add_argument(
        "--threads",
        default=None,
        help="torch CPU threads, or 'auto': every core (at most 4) when the 1-minute load average is "
        "below 1, else 1 (extra threads on a busy CPU spin and slow training down; default: torch's)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        from ssmkit.commands.demo import parse_threads
        from ssmkit.commands.eval import set_threads

        set_threads(parse_threads(args.threads))
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        # Only rank 0 talks; the others still report warnings and errors.
        logging.getLogger().setLevel(logging.WARNING)
    if args.bench:
        from ssmkit.training import bench

        argv = [
            "--presets",
            args.presets,
            "--seqlen",
            args.seqlen,
            "--steps",
            str(args.steps),
            *args.overrides,
        ]
        if args.json:
            argv += ["--json", args.json]
        return bench.main(argv)

    from ssmkit.training import Trainer, load_config

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.golden:
        overrides.append("checkpoint.golden=final")
    config = load_config(args.config, overrides)
    result = Trainer(config).fit()
    if rank == 0:
        logging.getLogger("ssmkit.train").info(
            "done: %d steps, final loss %.4f%s, output in %s",
            result.step,
            result.final_loss,
            "" if result.best_val_loss is None else f", best validation loss {result.best_val_loss:.4f}",
            result.out_dir,
        )
    from ssmkit.training.distributed import shutdown

    shutdown()
    return 0
