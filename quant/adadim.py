"""AdaDim: per layer, quantize per output channel or per input channel, whichever loses less.

Per-IC quantization (groups along the output dim inside one input column) isolates input
channels whose weights live on a different scale, e.g. the channels that carry activation
outliers; per-OC isolates output rows of different scale. The choice is made with RTN on the
calibration data, then the layer is quantized in that orientation with RTN or GPTQ.

The output error ||X W^T - X W_hat^T||_F is computed from the Hessian H = 2/N X^T X that GPTQ
accumulates anyway: ||X D^T||_F^2 = N/2 * tr(D H D^T) for D = W - W_hat, so no activations need
to be kept and the ordering of the two choices is the same.
"""
import torch

from quant.gptq import gptq_quantize
from quant.grid import DIMS, QuantizedWeight, rtn_quantize

METHODS = ("rtn", "gptq")


def output_error(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """sqrt(tr(D H D^T)) = sqrt(2/N) * ||X W^T - X W_hat^T||_F, D = W - W_hat."""
    diff = (weight - w_hat).to(hessian.dtype)
    return ((diff @ hessian) * diff).sum().clamp(min=0).sqrt()


def choose_dim(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = -1,
               sym: bool = False) -> str:
    """"oc" or "ic", whichever RTN orientation gives the smaller output error (ties: "oc")."""
    errors = [output_error(weight, rtn_quantize(weight, bits, group_size, sym, d).dequantize(),
                           hessian) for d in DIMS]
    return DIMS[int(errors[1] < errors[0])]


def adadim_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4,
                    group_size: int = -1, sym: bool = False, method: str = "rtn",
                    act_order: bool = False, static_groups: bool = False, block_size: int = 128,
                    percdamp: float = 0.01, cuda_graph: bool = True) -> QuantizedWeight:
    """Quantize a [out, in] weight in the orientation ``choose_dim`` picks (see ``.dim``).

    The GPTQ options apply with method "gptq"; static groups only exist per-OC, so they are
    dropped for a layer that goes per-IC (its grids are fitted per column just in time).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    dim = choose_dim(weight, hessian, bits, group_size, sym)
    if method == "rtn":
        return rtn_quantize(weight, bits, group_size, sym, dim)
    return gptq_quantize(weight, hessian, bits, group_size, sym, act_order,
                         static_groups and dim == "oc", dim, block_size, percdamp, cuda_graph)[0]
