"""Post-training weight quantization of a pretrain checkpoint: ``python -m quant.quantize``.

    python -m quant.quantize --checkpoint runs/demo --output runs/demo/w4-gptq --method gptq --bits 4
    torchrun --nproc-per-node 8 -m quant.quantize ...      # calibration and solves spread over ranks

The block linears (qkv, proj, fc1, fc2) are quantized; embeddings and the LM head stay 16-bit
(the GPTQ convention). Block by block, in true-sequential order (qkv -> proj -> fc1 -> fc2), each
linear's Hessian comes from its inputs with the earlier linears of the block already quantized,
and the block's outputs are recomputed through its quantized self before feeding the next block.
Calibration runs on 16-bit activations (QAT input quantizers switched off); their learned clips
are saved with the result for W4A4 evaluation. Distributed (torchrun, TP=1 so DP=N): each rank
runs its share of the calibration batches, each Hessian is chain-summed in batch order to its
module's owner rank, which solves it, and the result is broadcast (quant.hessian), so every rank
holds the same model, bit-identical to the one-rank result for any number of ranks.

Output: ``<output>/model.safetensors`` (quant.packing; its manifest records the method, the QAT
clips as extra tensors ``clip.<linear>``, and under ``info`` the source checkpoint, its config and
the calibration) and the same manifest as ``<output>/manifest.json`` for reading.
"""
import quiet  # noqa: F401  (first: silences known library noise before any library loads)
import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from qat.quantizer import InputQuantizer
from quant.adadim import adadim_quantize
from quant.convert import BLOCK_LINEARS
from quant.gptq import gptq_quantize
from quant.grid import QuantizedWeight, rtn_quantize
from quant.hessian import HessianAccumulator, quantize_distributed, rank_windows
from quant.packing import load_quantized, save_quantized

log = logging.getLogger("quant")
METHODS = ("rtn", "gptq", "adadim-rtn", "adadim-gptq")
QUANTIZED_FILE, MANIFEST_FILE = "model.safetensors", "manifest.json"


@dataclass
class QuantSpec:
    method: str = "gptq"
    bits: int = 4
    group_size: int = -1
    sym: bool = False
    act_order: bool = False
    percdamp: float = 0.01

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    @property
    def needs_hessian(self) -> bool:
        return self.method != "rtn"

    def solve(self, weight: torch.Tensor, hessian: torch.Tensor, cuda_graph: bool = True) -> QuantizedWeight:
        """Quantize one [out, in] weight given its input Hessian (``cuda_graph``: see gptq_quantize)."""
        common = dict(bits=self.bits, group_size=self.group_size, sym=self.sym, act_order=self.act_order,
                      percdamp=self.percdamp, cuda_graph=cuda_graph)
        if self.method == "gptq":
            return gptq_quantize(weight, hessian, **common)[0]
        return adadim_quantize(weight, hessian, method=self.method.removeprefix("adadim-"), **common)


class Timer:
    """Wall seconds of the timed sections, synchronizing CUDA so GPU work is counted where it runs."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        _sync()
        self._start = time.perf_counter()

    def __exit__(self, *exc):
        _sync()
        self.seconds += time.perf_counter() - self._start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _batches(windows: torch.Tensor, batch_size: int):
    return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]


class _InputRecorded(Exception):
    """Ends a calibration forward once the linear being calibrated has seen its input."""


# Block modules whose output is their last linear's output (Attention returns proj's, MLP fc2's).
TAIL_LINEARS = {"attn": "attn.proj", "mlp": "mlp.fc2"}


@contextlib.contextmanager
def _computed_as(module: torch.nn.Module, forward):
    """``module`` calls ``forward`` instead of its own (an instance attribute shadows the method)."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


class _BlockPasses:
    """The calibration passes of one block over the calibration batches ``hidden``: one per linear
    (true-sequential), then the block outputs through the quantized block.

    With ``reuse``, a pass computes from the block input only what the previous passes did not: a
    module of TAIL_LINEARS whose tail linear's inputs an earlier pass recorded (that linear is
    quantized since) is computed as that linear of them, once, and its outputs are read back by
    the passes after. The same modules on the same tensors give the same bits as recomputing the
    block; the cost is, per calibration token on this rank, (hidden + ffn) floats kept at a time.
    """

    def __init__(self, block: torch.nn.Module, hidden: list, reuse: bool):
        self.block, self.hidden, self.reuse = block, hidden, reuse
        self.tail_inputs: dict[str, list] = {}   # module -> its tail linear's input, by batch
        self.outputs: dict[str, list] = {}       # module -> its output, by batch

    def _forward(self, b: int, computed: dict | None):
        """Batch ``b`` through the block; the outputs computed from tail inputs go to ``computed``."""
        with contextlib.ExitStack() as stack:
            for name in self.outputs:
                stack.enter_context(_computed_as(self.block.get_submodule(name),
                                                 lambda *_, name=name: self.outputs[name][b]))
            for name in self.tail_inputs:
                def forward(*_, name=name):
                    y = self.block.get_submodule(TAIL_LINEARS[name])(self.tail_inputs[name][b])
                    if computed is not None:
                        computed.setdefault(name, []).append(y)
                    return y
                stack.enter_context(_computed_as(self.block.get_submodule(name), forward))
            return self.block(self.hidden[b])

    def calibrate(self, sub: str, record) -> None:
        """Every batch up to the input of linear ``sub``, which ``record`` gets (a call per batch)."""
        tail_of = {t: m for m, t in TAIL_LINEARS.items()}.get(sub) if self.reuse else None
        kept, computed = [], {}

        def hook(module, args):
            record(args[0])
            if tail_of is not None:
                kept.append(args[0])
            raise _InputRecorded             # the rest of the block is not needed

        handle = self.block.get_submodule(sub).register_forward_pre_hook(hook)
        try:
            for b in range(len(self.hidden)):
                try:
                    self._forward(b, computed)
                except _InputRecorded:
                    pass
        finally:
            handle.remove()
        for name, ys in computed.items():     # complete now: read back from here on
            self.outputs[name] = ys
            del self.tail_inputs[name]
        if tail_of is not None:
            self.tail_inputs[tail_of] = kept

    def block_outputs(self) -> list:
        return [self._forward(b, None) for b in range(len(self.hidden))]


@torch.no_grad()
def quantize_model(model, windows: torch.Tensor, spec: QuantSpec, batch_size: int = 8,
                   reuse: bool = True, cuda_graph: bool = True):
    """Quantize the block linears of a TP=1 GPT in place (weights become their dequantized
    values) from the calibration ``windows`` [n, seq] (all of them, on every rank: each rank runs
    its share of whole ``batch_size`` batches, so the result is the same for any world size).
    ``reuse`` (see _BlockPasses) and ``cuda_graph`` (see gptq_quantize) change the speed, not the
    result. Returns ({linear name: QuantizedWeight}, {"hessian": s, "solve": s})."""
    spec.validate()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    mine = rank_windows(len(windows), batch_size, rank, world)
    share = windows[mine.start:mine.stop]
    quantizers = [m for m in model.modules() if isinstance(m, InputQuantizer)]
    for q in quantizers:                     # calibrate on 16-bit activations
        q.active = False
    hessian_t, solve_t = Timer(), Timer()
    solve = functools.partial(spec.solve, cuda_graph=cuda_graph)
    results = {}
    hidden = [model.embedding(b.to(device)) for b in _batches(share, batch_size)] if spec.needs_hessian else []
    start, n_blocks = time.perf_counter(), len(model.blocks)
    for i, block in enumerate(model.blocks):
        passes = _BlockPasses(block, hidden, reuse)
        for j, sub in enumerate(BLOCK_LINEARS):
            name, linear = f"blocks.{i}.{sub}", block.get_submodule(sub)
            weight = linear.weight
            if spec.needs_hessian:
                acc = HessianAccumulator(weight.shape[1], device, keep_batches=rank > 0)

                def record(x, acc=acc):
                    with hessian_t:
                        acc.add(x)                   # one forward batch

                passes.calibrate(sub, record)
                with solve_t:
                    qw = quantize_distributed({name: weight}, {name: acc}, solve,
                                              first_index=len(BLOCK_LINEARS) * i + j)[name]
            else:
                with solve_t:
                    qw = rtn_quantize(weight, spec.bits, spec.group_size, spec.sym)
            weight.copy_(qw.dequantize(weight.dtype))
            results[name] = qw
        hidden = passes.block_outputs()  # through the quantized block
        elapsed = time.perf_counter() - start
        log.info(f"block {i + 1}/{n_blocks} quantized | {elapsed:.1f} s | "
                 f"{elapsed / (i + 1):.2f} s/block | ETA {elapsed / (i + 1) * (n_blocks - i - 1):.0f} s | "
                 f"hessian {hessian_t.seconds:.1f} s solve {solve_t.seconds:.1f} s")
    for q in quantizers:
        q.active = True
    return results, {"hessian": hessian_t.seconds, "solve": solve_t.seconds}


def qat_clips(model) -> dict[str, torch.Tensor]:
    """The learned [c_lo, c_hi] of every linear with a QAT input quantizer, by linear name."""
    from model.gpt import linears
    return {name: linear.input_quant.clip.detach().float().cpu()
            for name, linear in linears(model) if linear.input_quant is not None}


def save(output: str, results: dict, spec: QuantSpec, clips: dict, info: dict) -> dict:
    """Write the quantized checkpoint and its readable manifest; returns the manifest."""
    os.makedirs(output, exist_ok=True)
    manifest = save_quantized(os.path.join(output, QUANTIZED_FILE), results, spec.method, spec.act_order,
                              extra={f"clip.{name}": c for name, c in clips.items()}, info=info)
    with open(os.path.join(output, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def load(output: str, device="cpu"):
    """(layers, clips by linear name, manifest) of a directory written by ``save``; a CheckpointError
    when it has none or it is damaged."""
    from safetensors import SafetensorError

    from pretrain.checkpoint import CheckpointError

    path = os.path.join(output, QUANTIZED_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{output} holds no {QUANTIZED_FILE}; write it with python -m quant.quantize")
    try:
        ckpt = load_quantized(path, device)
    except (ValueError, SafetensorError) as e:   # a file that does not match its manifest; a broken file
        raise CheckpointError(f"refusing to load {path}: {e}") from None
    clips = {k.removeprefix("clip."): t for k, t in ckpt.extra.items() if k.startswith("clip.")}
    return ckpt.layers, clips, ckpt.manifest


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m quant.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or step dir (newest complete)")
    p.add_argument("--output", required=True, help="directory for model.safetensors + manifest.json")
    p.add_argument("--method", choices=METHODS, default="gptq")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4)
    p.add_argument("--group-size", type=int, default=-1, help="-1: per output channel; else e.g. 128")
    p.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    p.add_argument("--act-order", action="store_true", help="GPTQ columns by descending Hessian diagonal")
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--calib", help="calibration text (.jsonl/.json/.txt, optionally .gz/.xz: data_prep's input "
                                   "formats); default: C4 calibration slice")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows of the model's seq length")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--seed", type=int, default=0, help="calibration window offsets")
    args = p.parse_args(argv)
    if args.group_size != -1 and args.group_size <= 0:
        p.error(f"--group-size must be -1 or positive, got {args.group_size}")
    if args.nsamples < 1 or args.batch_size < 1:
        p.error("--nsamples and --batch-size must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    from data_prep.tokenizer import load_tokenizer
    from quant.corpora import CALIB_DOCS, calibration_windows
    from pretrain.reshard import load_checkpoint
    from quant.load import model_from_checkpoint, start_cli

    ckpt = load_checkpoint(args.checkpoint)      # refused before any work
    device = start_cli()
    spec = QuantSpec(args.method, args.bits, args.group_size, args.sym, args.act_order, args.percdamp)
    model = model_from_checkpoint(ckpt, device)
    cfg = ckpt.config
    log.info(f"{ckpt.path}: {cfg.model.num_layers} blocks, hidden {cfg.model.hidden_size}; "
             f"{spec.method} {spec.bits}-bit group {spec.group_size} on {dist.get_world_size()} rank(s)")
    windows = torch.empty(0, cfg.model.seq_length, dtype=torch.long)
    if spec.needs_hessian:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        windows = calibration_windows(tokenizer, cfg.model.seq_length, args.nsamples, args.seed, args.calib)
    results, times = quantize_model(model, windows, spec, args.batch_size)
    calib = {"source": args.calib or f"c4-sample documents [0, {CALIB_DOCS})", "nsamples": len(windows),
             "seq_length": cfg.model.seq_length, "seed": args.seed}
    info = {"checkpoint": ckpt.path, "iteration": ckpt.meta.get("iteration"), "config": ckpt.meta["config"],
            "tokenizer_sha256": ckpt.meta.get("tokenizer_sha256"), "spec": asdict(spec),
            "calibration": calib if spec.needs_hessian else None, "world_size": dist.get_world_size()}
    if dist.get_rank() == 0:
        save(args.output, results, spec, qat_clips(model), info)
        log.info(f"wrote {os.path.join(args.output, QUANTIZED_FILE)} ({len(results)} linears)")
    dist.barrier()
    total = time.perf_counter() - t0
    log.info(f"timing | hessian+solve seconds {times['hessian'] + times['solve']:.2f} "
             f"(hessian {times['hessian']:.2f}, solve {times['solve']:.2f}) | total seconds {total:.2f}")


if __name__ == "__main__":
    from quant.load import run_cli
    sys.exit(run_cli(main))
