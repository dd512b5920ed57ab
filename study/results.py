"""The result files of a study: ``OUT/arms/<run id>/result.json``, one per run, small enough to
commit, copy between machines and merge.

A result holds the run's identity (arm, seed, steps, tokens per step), its resolved training
config, the training curve (metrics.jsonl), and per evaluation point: the step, tokens, the
validation loss, each post-training spec's ``quant.evaluate`` JSON and a summary of
``quant.analyze``. ``complete`` turns true once every point is in.
"""
import json
import os
from dataclasses import asdict

from pretrain.config import ConfigError

# Config fields that name places on one machine, not what was trained.
MACHINE_LOCAL = (("train", "out_dir"), ("data", "cache_dir"), ("data", "paths"), ("data", "valid_paths"),
                 ("data", "tokenizer"), ("checkpoint", "resume"), ("train", "stop_at_step"))
ANALYSIS_KEYS = ("kurtosis", "output_kurtosis", "outliers_6x", "rmse_a4", "rmse_a8", "spectral_norm")


def path(out: str, run_id: str) -> str:
    return os.path.join(out, "arms", run_id, "result.json")


def read(out: str, run_id: str) -> dict | None:
    p = path(out, run_id)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return json.load(f)


def write(out: str, result: dict) -> None:
    """Atomically (a reader or a crash never sees half a file)."""
    p = path(out, result["id"])
    os.makedirs(os.path.dirname(p), exist_ok=True)
    tmp = f"{p}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, p)


def machine() -> str:
    """What the numbers were measured on, e.g. '1 x NVIDIA H200' or 'cpu'."""
    import torch
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    return "cpu"


def new(run, cfg: dict, plan) -> dict:
    return {"id": run.id, "arm": run.arm, "seed": run.seed, "steps": run.steps,
            "tokens_per_step": cfg["train"]["global_batch_size"] * cfg["model"]["seq_length"],
            "plan": plan.name, "baseline": plan.baseline, "arm_overrides": plan.arm(run.arm).overrides,
            "config": cfg, "posttrain": [asdict(s) for s in plan.posttrain], "machine": machine(),
            "seconds": {"train": 0.0, "posttrain": 0.0}, "points": [], "curve": [], "complete": False}


def comparable(cfg: dict) -> dict:
    """The config without its machine-local paths (results from other machines compare equal)."""
    out = json.loads(json.dumps(cfg))
    for section, key in MACHINE_LOCAL:
        out.get(section, {}).pop(key, None)
    return out


def read_curve(work: str) -> list[dict]:
    """metrics.jsonl of a run: the last record of each step and kind (training interval or
    validation), in step order; a resumed run may have logged a step twice. The per-layer values
    (``layers``) stay in metrics.jsonl and TensorBoard: the report does not read them, and they
    would outweigh everything else in the result file."""
    p = os.path.join(work, "metrics.jsonl")
    if not os.path.isfile(p):
        return []
    last = {}
    with open(p) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                r.pop("layers", None)
                last[(r["step"], "valid/loss" in r)] = r
    return [last[k] for k in sorted(last)]


def last_step(metrics_file: str) -> int | None:
    try:
        with open(metrics_file, "rb") as f:
            f.seek(max(0, os.path.getsize(metrics_file) - 4096))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.startswith("{")]
        return json.loads(lines[-1])["step"] if lines else None
    except (OSError, ValueError, KeyError):
        return None


def valid_loss(curve: list[dict], step: int) -> float | None:
    return next((r["valid/loss"] for r in curve if r["step"] == step and "valid/loss" in r), None)


def point(result: dict, step: int) -> dict | None:
    return next((p for p in result["points"] if p["step"] == step), None)


def spec_done(p: dict, spec) -> bool:
    """The point holds this spec's evaluation with each of its configurations (a plan that gained a
    configuration since makes the spec undone)."""
    return spec.name in p["eval"] and set(spec.configs) <= set(p["eval"][spec.name]["table"])


def has_point(result: dict, step: int, specs) -> bool:
    """The point at ``step`` is in with every spec's evaluation and the analysis."""
    p = point(result, step)
    return p is not None and "analysis" in p and all(spec_done(p, s) for s in specs)


def add_point(result: dict, point: dict, curve: list[dict]) -> None:
    """Insert (or replace) an evaluation point, with its tokens and validation loss."""
    point = {**point, "tokens": point["step"] * result["tokens_per_step"],
             "valid_loss": valid_loss(curve, point["step"])}
    result["points"] = sorted([p for p in result["points"] if p["step"] != point["step"]] + [point],
                              key=lambda p: p["step"])
    result["curve"] = curve


def analysis_summary(analysis: dict) -> dict:
    """quant.analyze's result for one checkpoint, cut to what the report uses: per linear input
    the ANALYSIS_KEYS (and the A4 error on the learned clips), and totals over the linears."""
    linears = {name: {k: v for k, v in stats.items() if k in ANALYSIS_KEYS or k.endswith("_clip")}
               for name, stats in analysis["linears"].items()}
    values = list(linears.values())
    residual = [s for n, s in linears.items() if n.endswith(("attn.proj", "mlp.fc2"))]
    return {"linears": linears,
            "mean_kurtosis": sum(s["kurtosis"] for s in values) / len(values),
            "mean_output_kurtosis_residual": sum(s["output_kurtosis"] for s in residual) / max(1, len(residual)),
            "outliers_6x": sum(s["outliers_6x"] for s in values),
            "llm_int8_dims": sum(len(d) for d in analysis["llm_int8_dims"].values()),
            "mean_rmse_a4": sum(s["rmse_a4"] for s in values) / len(values)}


def load_dir(out: str) -> dict[str, dict]:
    """Every result under OUT/arms, by run id."""
    root = os.path.join(out, "arms")
    if not os.path.isdir(root):
        return {}
    found = {}
    for run_id in sorted(os.listdir(root)):
        r = read(out, run_id)
        if r is not None:
            found[run_id] = r
    return found


def merge(dirs: list[str]) -> dict[str, dict]:
    """The results of several study directories (e.g. copied in from other machines) as one set:
    a run found in several has the union of their evaluation points (a complete copy's win on the
    same step) and the longest curve. Copies trained with different configs are refused."""
    merged: dict[str, dict] = {}
    for d in dirs:
        for run_id, r in load_dir(d).items():
            if run_id not in merged:
                merged[run_id] = r
                continue
            a = merged[run_id]
            if comparable(a["config"]) != comparable(r["config"]):
                raise ConfigError(f"{run_id}: the copies in {dirs} were trained with different configs")
            keep, other = (r, a) if r.get("complete") and not a.get("complete") else (a, r)
            points = {p["step"]: p for p in other["points"]}
            points.update({p["step"]: p for p in keep["points"]})
            merged[run_id] = {**keep, "points": [points[s] for s in sorted(points)],
                              "curve": max(a["curve"], r["curve"], key=len),
                              "complete": bool(a.get("complete") or r.get("complete"))}
    return merged
