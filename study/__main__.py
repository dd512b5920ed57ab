"""Run a recipe study: ``python -m study --plan configs/study/w4a4-125m.yaml --out runs/study``.

Every run of the plan (arm x seed x length) is pretrained, and at each evaluation point quantized
(quant.quantize), evaluated (quant.evaluate) and analyzed (quant.analyze); each run's numbers land in
OUT/arms/<run id>/result.json, and OUT/report.md, summary.json and the plots are made at the end
(or any time with ``python -m study.report OUT``). A rerun skips complete runs and continues partial
ones. SIGTERM / SIGUSR1 make the training processes save and the study stop (exit 0; a rerun
continues). Exit codes: 0 all selected runs complete or stopped by a signal, 1 a run failed (the
others still ran), 2 a bad plan or argument (refused before any work).

    python -m study --plan P --out DIR --concurrent 4            # 4 runs share one GPU
    python -m study --plan P --out DIR --concurrent 8 --devices 0,1,2,3,4,5,6,7   # one run per GPU
    python -m study --plan P --out DIR --arms baseline qat-kurt --seeds 1234  # a subset (several allocations)
    python -m study --plan P --list                              # run ids, one per line
    python -m study --plan P --out DIR --runs qat-kurt-seed2 baseline-seed2   # exactly these runs
    python -m study --plan P --out DIR --index $SLURM_ARRAY_TASK_ID   # one run (job arrays)
"""
import quiet  # noqa: F401  (first: silences known library noise; stdout of --list is the ids alone)
import argparse
import logging
import sys

from pretrain.config import ConfigError
from study import results
from study.plan import load_plan
from study.report import make_report
from study.runner import Runner

log = logging.getLogger("study")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, help="study plan YAML (configs/study/NAME.yaml)")
    p.add_argument("--out", help="study directory (results, report, work); default runs/study/<plan name>")
    p.add_argument("--arms", nargs="+", help="only these arms")
    p.add_argument("--seeds", type=int, nargs="+", help="only these seeds")
    p.add_argument("--runs", nargs="+", help="only these run ids (as --list prints them)")
    p.add_argument("--index", type=int, help="only the run with this index in --list order (a job array task)")
    p.add_argument("--list", action="store_true", help="print the selected run ids and exit")
    p.add_argument("--concurrent", type=int, default=1, help="runs at a time (they share the devices)")
    p.add_argument("--devices", help="comma-separated GPU ids handed out to the concurrent runs "
                                     "(gpus_per_run each, round robin); default: whatever is visible")
    p.add_argument("--corpus", help="replaces the plan's data.corpus directory")
    p.add_argument("--progress-interval", type=float, default=60.0, help="seconds between progress lines")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    try:
        plan = load_plan(args.plan, args.corpus)
        runs = plan.runs()
        if args.arms:
            unknown = sorted(set(args.arms) - {a.name for a in plan.arms})
            if unknown:
                raise ConfigError(f"--arms: no arm {unknown[0]!r} in {args.plan} "
                                  f"(arms: {', '.join(a.name for a in plan.arms)})")
            runs = [r for r in runs if r.arm in args.arms]
        if args.seeds:
            runs = [r for r in runs if r.seed in args.seeds]
        if args.runs:
            unknown = [r for r in args.runs if r not in {run.id for run in runs}]
            if unknown:
                raise ConfigError(f"--runs: no run {unknown[0]!r} in the selection of {args.plan} "
                                  "(python -m study --plan P --list prints them)")
            runs = [r for r in runs if r.id in args.runs]
        if args.index is not None:
            if not 0 <= args.index < len(runs):
                raise ConfigError(f"--index {args.index}: the selection has {len(runs)} runs (0..{len(runs) - 1})")
            runs = [runs[args.index]]
        if args.concurrent < 1:
            raise ConfigError(f"--concurrent must be >= 1, got {args.concurrent}")
    except ConfigError as e:
        print(f"plan error: {e}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(r.id for r in runs))
        return 0
    out = args.out or f"runs/study/{plan.name}"
    devices = args.devices.split(",") if args.devices else None
    try:
        failed, stopped = Runner(plan, out, args.concurrent, devices, args.progress_interval).run_all(runs)
    except ConfigError as e:
        print(f"plan error: {e}", file=sys.stderr)
        return 2
    if not args.no_report and results.load_dir(out):
        make_report([out], out, plan)
    if stopped:
        log.warning(f"[study] stopped by a signal: {', '.join(stopped)}; run the same command again to continue")
    if failed:
        log.error(f"[study] failed runs: {', '.join(failed)} (their logs are in {out}/work/<id>/logs)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
