"""Quantization-aware training of linear-layer inputs with learned clip values.

Each selected linear layer gets an :class:`InputQuantizer` in its ``input_quant`` slot. It
fake-quantizes the layer's input to ``bits`` with two learned scalars ``clip = (c_lo, c_hi)`` (the
math and its straight-through gradients are in DESIGN.md and ``kernels.fake_quant``).

Where the input comes from an elementwise or row-wise producer, the producer applies the
quantizer in its own kernel (``quantize_norm`` for the norms before qkv / fc1 / the LM head,
``quantize_act`` for the MLP activation before fc2): the unquantized activation is never written,
and backward recomputes it from the producer's input, which the producer keeps anyway. Every
other input (the attention output before proj) is quantized by ``run`` when the layer is called,
reading the producer's tensor in place; the layer's saved copy of x_hat is then replaced by a
recipe and x_hat is recomputed from x in backward (x is kept anyway: SDPA keeps its output). So QAT
adds no memory passes at fused inputs and keeps no activation the unquantized model would not keep.
With ``qat.recompute_inputs`` the fused inputs get the same treatment: the layer keeps the recipe
(the producer's input, which the producer keeps anyway, and its parameters) instead of x_hat, and
backward reruns the producer's forward kernel, which gives x_hat bit for bit. That keeps less than
the unquantized model (whose linear keeps the norm's or activation's output), for one memory-bound
kernel per site in backward.
"""
import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state

import kernels
from model.layers import activation, mark_tp_grad_sync, norm, tp_grad_sync
from qat.config import QATConfig

MSE_INIT_STDS = tuple(1.0 + 0.5 * i for i in range(15))     # the k of init=mse's mean +- k std candidates


_checkpoint_depth = 0


@contextlib.contextmanager
def checkpointed():
    """Marks a forward run under activation checkpointing (the first pass and the recompute). The
    checkpoint already drops every saved tensor and recomputes it, and saved-tensor hooks do not
    nest, so inside it the quantizer saves the plain way instead of keeping x for a recompute."""
    global _checkpoint_depth
    _checkpoint_depth += 1
    try:
        yield
    finally:
        _checkpoint_depth -= 1


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


class _Recompute:
    """What the layer keeps instead of x_hat: the kernel that made it and its (detached) arguments,
    all kept anyway by the producer."""
    __slots__ = ("kernel", "args")

    def __init__(self, kernel, *args):
        self.kernel, self.args = kernel, args


def _unpack(saved):
    if isinstance(saved, _Recompute):
        with torch.no_grad():
            return saved.kernel(*saved.args)
    return saved


def _keeping_recipe(linear, x_hat: torch.Tensor, recipe: _Recompute):
    """``linear(x_hat)`` with the layer's saved copy of x_hat replaced by ``recipe``."""
    key = _storage_key(x_hat)

    def pack(t):
        return recipe if _storage_key(t) == key else t

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        return linear(x_hat)


def _plain_save() -> bool:
    """Under activation checkpointing (which recomputes everything itself) and torch.compile (whose
    partitioner picks what to save), the layer keeps x_hat the plain way."""
    return bool(_checkpoint_depth) or torch.compiler.is_compiling()


class InputQuantizer(torch.nn.Module):
    """Learned asymmetric per-tensor clip fake quantizer for one linear layer's input."""

    def __init__(self, bits: int, init: str, init_value: float, splits_input: bool, recompute: bool = False):
        super().__init__()
        self.bits, self.init, self.recompute = bits, init, recompute
        self._recipe = None                  # (key of x_hat, _Recompute) from the fused producer, for run()
        # (c_lo, c_hi) in one 1-D parameter: DeepSpeed's broadcasts cannot take 0-dim tensors.
        self.clip = torch.nn.Parameter(torch.tensor([-float(init_value), float(init_value)]))
        self.clip.is_clip = True             # own optimizer group: no weight decay, no momentum
        if splits_input:                     # each TP rank sees part of the input: sum clip grads over TP
            mark_tp_grad_sync(self.clip)
        self.register_buffer("initialized", torch.tensor(init == "constant"))
        self._ready = None                   # host copy of `initialized`: no device sync per forward
        self.active = True                   # switched by the trainer (qat.start_step)
        self.clip_fraction = None            # fraction of inputs clipped, filled when record_stats is on
        self.record_stats = False
        # Set when the producer of this layer's input applies the quantizer in its own kernel
        # (the model's wiring is fixed, so this holds from the first forward on): run() then takes
        # its input as quantized, also when activation checkpointing recomputes the layer alone.
        self.fused = False

    @torch.no_grad()
    def _init_from_batch(self, x: torch.Tensor) -> None:
        """Clips from the first batch, agreed over the TP ranks holding parts of it: its
        min/max (init=minmax), or the candidate mean +- k std (inside min/max) whose quantization
        has the least squared error (init=mse): min/max spends 4-bit steps on rare extremes, and
        one constant cannot fit inputs of different scales (attention outputs, MLP activations)."""
        x = x.detach().float().reshape(-1, x.shape[-1])
        lo, hi = x.min().reshape(1), x.max().reshape(1)
        moments = torch.stack([x.sum(dtype=torch.float64), x.square().sum(dtype=torch.float64),
                               torch.tensor(x.numel(), dtype=torch.float64, device=x.device)])
        _all_reduce(lo, dist.ReduceOp.MIN)
        _all_reduce(hi, dist.ReduceOp.MAX)
        _all_reduce(moments, dist.ReduceOp.SUM)
        if self.init == "mse":
            mean = moments[0] / moments[2]
            std = (moments[1] / moments[2] - mean * mean).clamp(min=0).sqrt()
            candidates = [torch.cat([torch.maximum(lo, (mean - k * std).float()),
                                     torch.minimum(hi, (mean + k * std).float())]) for k in MSE_INIT_STDS]
            errors = torch.stack([(kernels.fake_quant_forward(x, c, self.bits) - x).square().sum(dtype=torch.float64)
                                  for c in candidates])
            _all_reduce(errors, dist.ReduceOp.SUM)
            lo, hi = candidates[int(errors.argmin())].split(1)
        if not hi > lo:
            hi = lo + 1.0
        self.clip.copy_(torch.cat([lo, hi]))
        self.initialized.fill_(True)
        self._ready = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = None

    @property
    def needs_init(self) -> bool:
        """Waiting for the first batch to set its clips (qat.init minmax|mse)."""
        if self._ready is None:
            self._ready = bool(self.initialized)
        return not self._ready

    def _clip(self, pre_quant) -> torch.Tensor:
        """The clips for this forward; the first batch's statistics set them under init=minmax|mse
        (`pre_quant()` computes the unquantized input for that, once)."""
        if self.needs_init:
            with torch.no_grad():   # no autograd graph: a checkpoint's recompute, already initialized, builds none
                self._init_from_batch(pre_quant())
        return tp_grad_sync(self.clip)

    def _quantize(self, kernel, pre_quant, *args):
        """``kernel(*args, clip, bits)``, recording the clipped fraction when asked."""
        clip = self._clip(pre_quant)
        clipped = torch.zeros((), dtype=torch.int64, device=clip.device) if self.record_stats else None
        x_hat = kernel(*args, clip, self.bits, clipped=clipped)
        if clipped is not None:
            self.clip_fraction = clipped / x_hat.numel()
        if self.recompute and self.fused and torch.is_grad_enabled() and not _plain_save():
            detached = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            self._recipe = _storage_key(x_hat), _Recompute(kernel, *detached, clip.detach(), self.bits)
        return x_hat

    def quantize_norm(self, x, weight, bias, eps: float, kind: str) -> torch.Tensor:
        """x_hat = fake_quant(norm(x)) in one kernel (the norm that feeds this layer)."""
        self.fused = True
        return self._quantize(kernels.norm_fake_quant, lambda: norm(x, weight, bias, eps, kind),
                              x, weight, bias, eps, kind)

    def quantize_act(self, a, kind: str) -> torch.Tensor:
        """x_hat = fake_quant(act(a)) in one kernel (the MLP activation that feeds this layer)."""
        self.fused = True
        return self._quantize(kernels.act_fake_quant, lambda: activation(a, kind), a, kind)

    @property
    def fuse_into_producer(self) -> bool:
        """Asks the producer of this layer's input to quantize in its own kernel (when active)."""
        return self.active

    def run(self, linear, x: torch.Tensor):
        """``linear(fake_quant(x))``, or ``linear(x)`` when x's producer quantized it. Quantized
        here, x_hat is recomputed in backward rather than kept beside x."""
        if not self.active:
            return linear(x.contiguous())
        if self.fused:
            recipe, self._recipe = self._recipe, None
            if recipe is not None and recipe[0] == _storage_key(x):
                return _keeping_recipe(linear, x, recipe[1])
            return linear(x)
        x_hat = self._quantize(kernels.fake_quant, lambda: x, x)
        if _plain_save():
            return linear(x_hat)
        return _keeping_recipe(linear, x_hat, _Recompute(kernels.fake_quant_forward, x.detach(),
                                                         self.clip.detach(), self.bits))

    @property
    def c_lo(self) -> torch.Tensor:
        return self.clip[0]

    @property
    def c_hi(self) -> torch.Tensor:
        return self.clip[1]

    def extra_repr(self) -> str:
        return f"bits={self.bits}, init={self.init}"


def _all_reduce(t: torch.Tensor, op) -> None:
    """Over the TP group: the ranks that see parts of a layer's input (its channels, or its tokens
    under sequence parallelism). Data-parallel replicas initialize from the same batch
    (pretrain.trainer), so they agree without a reduction."""
    if dist.is_initialized():
        dist.all_reduce(t, op=op, group=parallel_state.get_tensor_model_parallel_group())


def attach_qat(model: torch.nn.Module, cfg: QATConfig) -> list[InputQuantizer]:
    """Give every selected linear an input quantizer; returns them (empty when QAT is off)."""
    from model.gpt import linears

    if not cfg.enabled:
        return []
    quantizers = []
    for name, linear in linears(model):
        if name.rsplit(".", 1)[-1] in cfg.layers:
            linear.input_quant = InputQuantizer(cfg.bits, cfg.init, cfg.init_value, linear.splits_input,
                                                cfg.recompute_inputs)
            quantizers.append(linear.input_quant)
    return quantizers


def set_qat_step(quantizers: list[InputQuantizer], step: int, cfg: QATConfig) -> None:
    for q in quantizers:
        q.active = step >= cfg.start_step
