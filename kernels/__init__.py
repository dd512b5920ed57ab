"""Fused Triton kernels for QAT, each beside a plain-PyTorch reference of the same math.

Pure functions of tensors: no model, no config. `impl=None` picks Triton on CUDA tensors and the
PyTorch reference elsewhere; "triton" / "torch" force one (tests run Triton on CPU under
TRITON_INTERPRET=1).
"""
from .fake_quant import fake_quant, fake_quant_backward, fake_quant_forward
from .kurtosis import KURTOSIS_EPS, token_kurtosis

__all__ = ["fake_quant", "fake_quant_forward", "fake_quant_backward", "token_kurtosis",
           "KURTOSIS_EPS"]
