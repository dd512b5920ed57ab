"""The float64 reference of the learned-clip fake quantizer, shared by the tests and bench/kernel_bandwidth.py."""
import torch


def fake_quant64(x: torch.Tensor, clip: torch.Tensor, bits: int) -> torch.Tensor:
    """DESIGN.md's x_hat = round(z) / s + c_lo in float64: the definition itself, not any fp32
    implementation of it (those must land within rounding of it)."""
    c_lo, c_hi = clip.detach().double()
    s = (2 ** bits - 1) / (c_hi - c_lo)
    return torch.round((torch.clamp(x.double(), c_lo, c_hi) - c_lo) * s) / s + c_lo
