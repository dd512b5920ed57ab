"""Pretrain a GPT: ``python -m pretrain.train --config configs/NAME.yaml [--section.key value ...]``.

Start it with torchrun, the deepspeed launcher or srun (one process per GPU), or plainly for a
world of one. SIGTERM / SIGUSR1 (SLURM's preemption warning) finish the current step, save a
checkpoint and exit 0, so a requeued job resumes with ``--resume auto`` (the default).
Exit codes: 0 done or stopped cleanly, 2 configuration / data / checkpoint problem (refused), 1 anything else
(including train.max_nonfinite_steps non-finite losses in a row).
"""
import quiet  # noqa: F401  (first: silences known library noise before any library loads)
import argparse
import logging
import sys

from pretrain.config import ConfigError, load_config, validate, world_size_from_env
from pretrain.config_reference import help_text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__, epilog=help_text(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (configs/NAME.yaml)")
    parser.add_argument("--resume", help="auto (newest complete checkpoint) | none | a checkpoint path; "
                                         "the same as --checkpoint.resume")
    args, overrides = parser.parse_known_args(argv)
    if args.resume is not None:
        overrides += ["--checkpoint.resume", args.resume]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    try:
        cfg = load_config(args.config, overrides)
        validate(cfg, world_size_from_env())
    except (ConfigError, OSError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from pretrain.run import run    # torch, megatron-core and DeepSpeed load only now
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
