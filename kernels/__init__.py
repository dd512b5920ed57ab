"""Fused Triton kernels for QAT and the loss, each beside a plain-PyTorch reference of the same math.

Pure functions of tensors: no model, no config. `impl=None` picks Triton on CUDA tensors and the
PyTorch reference elsewhere; "triton" / "torch" force one (tests run Triton on CPU under
TRITON_INTERPRET=1). The fake quantizer comes alone (`fake_quant`) or fused into the producer of
a linear's input (`norm_fake_quant`, `act_fake_quant`); `cross_entropy` is the loss.

Each kernel of the blocks is also a `torch.library` custom op (namespace `qat_kernels`) with a fake (meta)
implementation and, for the quantizers, registered autograd: under torch.compile the public
functions call those, so a compiled graph holds them without breaks; eager keeps the autograd
functions (a custom op's eager dispatch costs ~1.6× their host time). Both run the same implementations.
The loss runs outside the compiled blocks, so `cross_entropy` is not a custom op.
"""
from .cross_entropy import cross_entropy
from .mlp_act import act_fake_quant
from .fake_quant import fake_quant, fake_quant_backward, fake_quant_forward
from .kurtosis import KURTOSIS_EPS, token_kurtosis, token_kurtosis_grad, token_kurtosis_stats
from .norm_quant import norm_fake_quant

__all__ = ["cross_entropy", "fake_quant", "fake_quant_forward", "fake_quant_backward", "norm_fake_quant", "act_fake_quant",
           "token_kurtosis", "token_kurtosis_stats", "token_kurtosis_grad", "KURTOSIS_EPS"]
