"""The study report: ``python -m study.report DIR [MORE_DIRS ...] [--output OUT]``.

Reads every ``arms/*/result.json`` under the directories (merged: results copied in from other
machines count), and writes to OUT (default: the first DIR) ``report.md``, ``summary.json``, the
plots ``cliff.png``, ``outliers.png`` and ``kurtosis.png``, and, when merging, the merged result
files under ``OUT/arms``. Checkpoints are not needed.

The headline of every arm is its W4A4 perplexity against the **baseline arm's W16A16** at the
same point (same seed where the baseline has it, else the baseline's mean over seeds). A QAT
model's W16A16 is its quantizers switched off, which nobody deploys: it is marked †, never a headline.
"""
import quiet  # noqa: F401  (first: silences known library noise before any library loads)
import argparse
import json
import os
import statistics
import sys
import time

from pretrain.config import ConfigError
from quant.convert import QUANTIZERS_OFF
from study import results

PPL = ("wikitext2_ppl", "c4_ppl")
CORPUS = {"wikitext2_ppl": "WikiText-2", "c4_ppl": "C4"}
QAT_NOTE = (f"† {QUANTIZERS_OFF}: a QAT model's A16 configurations switch off the quantizers it was trained "
            "with on clamped 4-bit inputs; it runs with its learned clips (A8 and A4 use their range). Its "
            "16-bit-weight reference is W16A4, the model as trained.")


# ---- the numbers ------------------------------------------------------------------------------
def values(eval_json: dict) -> dict[str, dict[str, float]]:
    """{config: {metric: value}} of one quant.evaluate JSON."""
    return {cfg: {m: cell["value"] for m, cell in metrics.items()} for cfg, metrics in eval_json["table"].items()}


def summarize(merged: dict[str, dict]) -> dict:
    """summary.json: per run and evaluation point the tokens, valid loss and every configuration's
    numbers per spec, plus the analysis totals; no derived numbers (the report derives them)."""
    runs = {}
    for run_id, r in sorted(merged.items()):
        runs[run_id] = {
            "arm": r["arm"], "seed": r["seed"], "steps": r["steps"], "complete": r.get("complete", False),
            "qat": r["config"]["qat"]["enabled"], "kurtosis": r["config"]["kurtosis"]["enabled"],
            "machine": r.get("machine"), "seconds": r.get("seconds"),
            "points": [{"step": p["step"], "tokens": p["tokens"], "valid_loss": p["valid_loss"],
                        "eval": {spec: values(e) for spec, e in p["eval"].items()},
                        "analysis": {k: v for k, v in p.get("analysis", {}).items() if k != "linears"}}
                       for p in r["points"]]}
    baselines = sorted({r.get("baseline", "baseline") for r in merged.values()})
    # every run's specs, in plan order (runs made before a spec joined the plan lack it)
    specs = list(dict.fromkeys(s["name"] for r in merged.values() for s in r["posttrain"]))
    return {"baseline": baselines[0] if baselines else "baseline", "specs": specs, "runs": runs}


def _point(run: dict, step: int) -> dict | None:
    return next((p for p in run["points"] if p["step"] == step), None)


def _value(point: dict | None, spec: str, config: str, metric: str) -> float | None:
    if point is None:
        return None
    return point["eval"].get(spec, {}).get(config, {}).get(metric)


def _any_spec(point: dict | None, config: str, metric: str) -> float | None:
    """A configuration whose weights stay 16-bit (W16Ax) is the same under every spec: the first found."""
    if point is None:
        return None
    return next((t[config][metric] for t in point["eval"].values() if metric in t.get(config, {})), None)


def baseline_w16(summary: dict, run: dict, step: int, metric: str) -> float | None:
    """The baseline arm's W16A16 at this run's length and step (under any spec: specs the baseline
    does not run, like a QAT model's W16A4, still get it): same seed if run, else the mean."""
    same = [r for r in summary["runs"].values() if r["arm"] == summary["baseline"] and r["steps"] == run["steps"]]
    own = [r for r in same if r["seed"] == run["seed"]]
    vals = [v for r in (own or same) if (v := _any_spec(_point(r, step), "W16A16", metric)) is not None]
    return statistics.fmean(vals) if vals else None


def change(value: float | None, ref: float | None) -> float | None:
    return None if value is None or not ref else 100.0 * (value / ref - 1.0)


def headline(summary: dict, run: dict, step: int, spec: str, metric: str, config: str = "W4A4") -> float | None:
    """% change of the run's ``config`` against the baseline arm's W16A16 at the same point."""
    return change(_value(_point(run, step), spec, config, metric), baseline_w16(summary, run, step, metric))


def groups(summary: dict, main_only: bool = True) -> dict[tuple[str, int], list[dict]]:
    """Runs by (arm, steps) in first-seen order; main_only: each arm's longest length only."""
    out: dict[tuple[str, int], list[dict]] = {}
    for r in summary["runs"].values():
        out.setdefault((r["arm"], r["steps"]), []).append(r)
    if main_only:
        longest = {}
        for arm, steps in out:
            longest[arm] = max(steps, longest.get(arm, 0))
        out = {k: v for k, v in out.items() if longest[k[0]] == k[1]}
    return out


def stat(vals: list) -> tuple[float, float | None, int] | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def fmt(s, pct: bool = False, digits: int = 4) -> str:
    if s is None:
        return "—"
    mean, sd, _ = s
    text = f"{mean:+.1f} %" if pct else f"{mean:.{digits}g}"
    if sd is not None:
        text += f" ± {sd:.1f}" if pct else f" ± {sd:.{max(1, digits - 2)}g}"
    return text


# ---- the report -------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def spec_configs(summary: dict, spec: str) -> list[str]:
    """The configurations evaluated under ``spec``, in the order of the plan's list."""
    return list(dict.fromkeys(c for r in summary["runs"].values() for p in r["points"] for c in p["eval"].get(spec, {})))


def main_table(summary: dict, spec: str) -> str:
    configs = spec_configs(summary, spec)
    header = ["arm", "seeds", "tokens", "valid loss"]
    header += [f"{CORPUS[m]} {c}" for m in PPL for c in configs]
    header += [f"W4A4 vs baseline W16A16 ({CORPUS[m]})" for m in PPL]
    header += [f"W4A4 vs own 16-bit weights ({CORPUS[m]}; QAT: W16A4)" for m in PPL]
    rows = []
    for (arm, steps), runs in groups(summary).items():
        finals = [(r, _point(r, steps)) for r in runs]
        qat = any(r["qat"] for r in runs)
        row = [arm + (" (QAT)" if qat else ""), ", ".join(str(r["seed"]) for r in runs),
               f"{steps * _tokens_per_step(runs[0]) / 1e6:.1f} M", fmt(stat([p and p["valid_loss"] for _, p in finals]))]
        own = "W16A4" if qat else "W16A16"
        for m in PPL:
            for c in configs:
                cell = fmt(stat([_value(p, spec, c, m) for _, p in finals]))
                row.append(cell + (" †" if qat and c.endswith("A16") and cell != "—" else ""))
        row += [f"**{fmt(stat([headline(summary, r, steps, spec, m) for r in runs]), pct=True)}**" for m in PPL]
        row += [fmt(stat([change(_value(p, spec, 'W4A4', m), _any_spec(p, own, m)) for _, p in finals]),
                    pct=True) for m in PPL]
        rows.append(row)
    return _table(header, rows)


def _tokens_per_step(run: dict) -> int:
    p = run["points"][0] if run["points"] else None
    return p["tokens"] // p["step"] if p else 0


def cliff_table(summary: dict, spec: str) -> str:
    """W4A4 vs baseline W16A16 at every point of the main runs and at every separate length."""
    cols = sorted({(r["steps"], p["step"], p["tokens"]) for r in summary["runs"].values() for p in r["points"]
                   if spec in p["eval"]}, key=lambda c: (c[2], c[0]))
    header = ["arm"] + [f"{t / 1e6:.0f} M tok ({'step ' + str(s) + ' of ' + str(n) if s != n else str(n) + '-step run'})"
                        for n, s, t in cols]
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in summary["runs"].values()):
        runs = [r for r in summary["runs"].values() if r["arm"] == arm]
        row = [arm]
        for n, s, _ in cols:
            cell = [" / ".join(fmt(stat([headline(summary, r, s, spec, m) for r in runs if r["steps"] == n]),
                                   pct=True) for m in PPL)]
            row += cell
        rows.append(row)
    return _table(header, rows)


def extra_spec_table(summary: dict, spec: str) -> str:
    configs = spec_configs(summary, spec)
    header = ["arm", "seeds"] + [f"{CORPUS[m]} {c}" for m in PPL for c in configs]
    header += [f"{c} vs baseline W16A16 ({CORPUS[m]})" for m in PPL for c in configs if c != "W16A16"]
    rows = []
    for (arm, steps), runs in groups(summary).items():
        finals = [_point(r, steps) for r in runs]
        if not any(p and spec in p["eval"] for p in finals):
            continue
        row = [arm, ", ".join(str(r["seed"]) for r in runs)]
        qat = any(r["qat"] for r in runs)
        row += [fmt(stat([_value(p, spec, c, m) for p in finals])) + (" †" if qat and c.endswith("A16") else "")
                for m in PPL for c in configs]
        row += ["†" if qat and c.endswith("A16") else fmt(stat([headline(summary, r, steps, spec, m, c) for r in runs]),
                                                          pct=True)
                for m in PPL for c in configs if c != "W16A16"]
        rows.append(row)
    return _table(header, rows) if rows else "No final point has this spec yet."


def runs_table(summary: dict, spec: str) -> str:
    configs = spec_configs(summary, spec)
    header = ["run", "step", "tokens", "valid loss"] + [f"{c} wiki / C4" for c in configs]
    rows = []
    for run_id, r in summary["runs"].items():
        for p in r["points"]:
            rows.append([run_id + ("" if r["complete"] else " (partial)"), str(p["step"]), f"{p['tokens'] / 1e6:.1f} M",
                         "—" if p["valid_loss"] is None else f"{p['valid_loss']:.4f}"]
                        + [" / ".join("—" if (v := _value(p, spec, c, m)) is None else f"{v:.2f}" for m in PPL)
                           for c in configs])
    return _table(header, rows)


def analysis_table(summary: dict) -> str:
    header = ["arm", "mean input kurtosis", "residual output kurtosis", "6x outlier channels", "LLM.int8 dims",
              "mean A4 RMSE (per-token min-max)"]
    keys = ("mean_kurtosis", "mean_output_kurtosis_residual", "outliers_6x", "llm_int8_dims", "mean_rmse_a4")
    rows = []
    for (arm, steps), runs in groups(summary).items():
        finals = [_point(r, steps) for r in runs]
        rows.append([arm] + [fmt(stat([p and p["analysis"].get(k) for p in finals])) for k in keys])
    return _table(header, rows)


def write_markdown(summary: dict, out: str, plots: list[str], plan_name: str) -> str:
    spec = summary["specs"][0]
    machines = sorted({r["machine"] or "?" for r in summary["runs"].values()})
    done = sum(r["complete"] for r in summary["runs"].values())
    parts = [f"# Study `{plan_name}`", "",
             f"Made by `python -m study.report` on {time.strftime('%Y-%m-%d')} from {len(summary['runs'])} runs "
             f"({done} complete) measured on {', '.join(machines)}. Perplexities are WikiText-2 test and the C4 "
             f"evaluation slice; weights of spec `{spec}`; the baseline arm is `{summary['baseline']}`. "
             f"Cells over several seeds are mean ± standard deviation over seeds.", "",
             "## Final points (each arm's longest run)", "", main_table(summary, spec), "", QAT_NOTE, "",
             "## W4A4 against the baseline's W16A16 over training (WikiText-2 / C4)", "",
             "Columns of one run at several steps share its LR schedule (intermediate checkpoints); an "
             "N-step run is a separate run with its own schedule.", "", cliff_table(summary, spec), ""]
    for other in summary["specs"][1:]:
        parts += [f"## Post-training spec `{other}` (final points)", "", extra_spec_table(summary, other), ""]
    parts += ["## Outlier analysis (final points; quant.analyze, 16-bit activations)", "", analysis_table(summary), "",
              "## Every run and point", "", runs_table(summary, spec), ""]
    parts += [f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.basename(p)})" for p in plots]
    return "\n".join(parts) + "\n"


# ---- plots ------------------------------------------------------------------------------------
def plot(summary: dict, merged: dict, out: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec, paths = summary["specs"][0], []
    arms = list(dict.fromkeys(r["arm"] for r in summary["runs"].values()))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, m in zip(axes, PPL):
        for i, arm in enumerate(arms):
            color = f"C{i % 10}"
            by_len = {}
            for r in summary["runs"].values():
                if r["arm"] == arm:
                    by_len.setdefault(r["steps"], []).append(r)
            longest = max(by_len)
            pts = [(p["tokens"], p["step"]) for p in by_len[longest][0]["points"]]
            ys = [stat([headline(summary, r, s, spec, m) for r in by_len[longest]]) for _, s in pts]
            xy = [(t / 1e6, y[0], y[1] or 0.0) for (t, _), y in zip(pts, ys) if y is not None]
            seeds = len(by_len[longest])
            if xy:
                x, y, err = zip(*xy)
                ax.errorbar(x, y, yerr=err if seeds > 1 else None, fmt="o-", color=color, capsize=3,
                            label=f"{arm} (points of one run" + (f", mean ± sd of {seeds} seeds)" if seeds > 1 else ")"))
            sep = []
            for steps, runs in sorted(by_len.items()):
                y = stat([headline(summary, r, steps, spec, m) for r in runs])
                if y is not None:
                    sep.append((steps * _tokens_per_step(runs[0]) / 1e6, y[0]))
            if len(by_len) > 1 and sep:
                ax.plot(*zip(*sep), "s--", color=color, alpha=0.7, label=f"{arm} (separate lengths)")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("W4A4 perplexity vs baseline W16A16 (%)")
        ax.set_title(f"W4A4 cliff, {CORPUS[m]}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out, "cliff.png"))
    _savefig(fig, paths[-1])

    fig, axes = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    names = None
    for i, arm in enumerate(arms):
        runs = [r for r in merged.values() if r["arm"] == arm]
        run = max(runs, key=lambda r: (r["steps"], -r["seed"]))
        analyzed = [p for p in run["points"] if "analysis" in p]   # the final point, else the latest analyzed
        if not analyzed:
            continue
        final = analyzed[-1]
        label = run["id"] + ("" if final["step"] == run["steps"] else f" step {final['step']}")
        lin = final["analysis"]["linears"]
        names = names or list(lin)
        clip = any(k.endswith("_clip") for k in lin[names[0]])
        axes[0].plot(range(len(names)), [lin[n]["outliers_6x"] for n in names], "o-", color=f"C{i % 10}",
                     label=label)
        axes[1].plot(range(len(names)), [next((v for k, v in lin[n].items() if k.endswith("_clip")), lin[n]["rmse_a4"])
                                         for n in names], "o-", color=f"C{i % 10}",
                     label=f"{label} ({'learned clips' if clip else 'per-token min-max'})")
    if names:
        axes[0].set_ylabel("6x outlier channels")
        axes[1].set_ylabel("A4 RMSE of the input")
        axes[1].set_xticks(range(len(names)), [n.removeprefix("blocks.") for n in names], rotation=90, fontsize=6)
        axes[0].set_title("per linear input at the final point (the W4A4 quantizer each model uses)")
        for ax in axes:
            ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out, "outliers.png"))
    _savefig(fig, paths[-1])

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, arm in enumerate(arms):
        runs = [r for r in merged.values() if r["arm"] == arm]
        run = max(runs, key=lambda r: (r["steps"], -r["seed"]))
        pts = [(p["tokens"] / 1e6, p["analysis"]["mean_output_kurtosis_residual"]) for p in run["points"]
               if "analysis" in p]
        if pts:
            ax.plot(*zip(*pts), "o-", color=f"C{i % 10}", label=f"{run['id']} (quant.analyze)")
        curve = [(c["step"] * run["tokens_per_step"] / 1e6, c["kurtosis/mean"]) for c in run["curve"]
                 if "kurtosis/mean" in c]
        if curve:
            ax.plot(*zip(*curve), "-", color=f"C{i % 10}", alpha=0.4, lw=0.8, label=f"{run['id']} (training log)")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("mean kurtosis of attn.proj / mlp.fc2 outputs")
    ax.set_title("output kurtosis over training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out, "kurtosis.png"))
    _savefig(fig, paths[-1])
    return paths


def _savefig(fig, path: str) -> None:
    import matplotlib.pyplot as plt
    tmp = f"{path}.{os.getpid()}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _write(path: str, text: str) -> None:
    """Atomically, also when several job-array tasks write the report at once."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def make_report(dirs: list[str], out: str, plan=None) -> dict:
    """Merge the result files of ``dirs`` and write the report into ``out``; returns summary.json's content."""
    merged = results.merge(dirs)
    if not merged:
        raise ConfigError(f"no results under {', '.join(d + '/arms' for d in dirs)}")
    os.makedirs(out, exist_ok=True)
    if [os.path.abspath(d) for d in dirs] != [os.path.abspath(out)]:
        for r in merged.values():
            results.write(out, r)
    summary = summarize(merged)
    if plan is not None:
        summary["baseline"] = plan.baseline
    plan_name = plan.name if plan is not None else next(iter(merged.values()))["plan"]
    _write(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
    plots = plot(summary, merged, out)
    _write(os.path.join(out, "report.md"), write_markdown(summary, out, plots, plan_name))
    print(f"[study] wrote {out}/report.md, summary.json and {len(plots)} plots from {len(merged)} runs", flush=True)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m study.report", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="study directories (their arms/*/result.json are merged)")
    p.add_argument("--output", help="where the report goes; default: the first directory")
    args = p.parse_args(argv)
    try:
        make_report(args.dirs, args.output or args.dirs[0])
    except ConfigError as e:
        print(f"report error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
