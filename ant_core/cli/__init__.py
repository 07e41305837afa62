"""The `ant` command.

    ant cluster [--schedule linear] [--T 1000] [--k 5] [--objective log_snr] [--json] [--plot F]
    ant train   [--config FILE.json|yaml] [--out DIR] [--resume [CKPT]] [--<field> VALUE ...]
    ant sample  CHECKPOINT|RUN_DIR [--sampler ddim|ddpm] [--steps 50] [--num 16] [--seed 0]
    ant demo    [--out DIR] [--steps N] [--quick]
    ant affinity RUN_DIR|CKPT... [--M 100] [--d 4096] [--batches 4] [--out F.npy] [--plot F]

`ant cluster` does not import torch; the other subcommands import it inside their functions.
"""
import argparse
import os
import sys

from . import affinity, cluster, demo, sample, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ant", description="ANT for diffusion training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in (cluster, train, sample, demo, affinity):
        command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `ant cluster | head`: the reader left; no traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, TypeError, OSError, ImportError) as exc:  # OSError: a path's fault
        parser.exit(2, f"ant {args.command}: error: {exc}\n")
    except RuntimeError as exc:
        from ..trainer import TrainingError

        if not isinstance(exc, TrainingError):
            raise
        parser.exit(1, f"ant {args.command}: error: {exc}\n")
