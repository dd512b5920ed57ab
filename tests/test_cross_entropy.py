"""kernels.cross_entropy (Triton under the interpreter on CPU, and the PyTorch reference) vs float64,
with the vocabulary whole and split over 2 real gloo ranks; lm_loss vs megatron-core's
vocab_parallel_cross_entropy, the loss it replaced."""
import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels.cross_entropy import cross_entropy
from tests.dist_utils import run_distributed

IMPLS = ["torch", "triton"]


def _lse_error(x):
    """About what fp32 gets wrong in lse = log sum exp(x): 2 ulps of the largest logit (the logits
    are read exactly, bf16/fp16 too; all math is fp32)."""
    return 2 * torch.finfo(torch.float32).eps * x.abs().max().item()


def _assert_loss_close(losses, ref, x):
    torch.testing.assert_close(losses.double(), ref.double(), rtol=1e-6, atol=_lse_error(x))


def _logits(shape, dtype, seed):
    """Logits with a few large entries per row (confident predictions, far from 0)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 4
    x[..., ::97] += 30.0 if dtype != torch.float16 else 10.0
    return x.to(dtype)


def _reference64(x, labels, g):
    """Per-token losses and the logits' gradient, in float64 by autograd."""
    x64 = x.double().requires_grad_()
    losses = F.cross_entropy(x64.flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)
    losses.backward(g.double())
    return losses.detach(), x64.grad


def _assert_grad_close(grad, ref64, x):
    """Within one rounding to the logits' dtype (of the largest gradient) plus the relative error
    that lse's error makes in exp(x - lse)."""
    tol = torch.finfo(x.dtype).eps + _lse_error(x)
    err = (grad.double() - ref64).abs().max() / ref64.abs().max()
    assert err <= tol, f"{x.dtype}: gradient max rel error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 7, 300), (3, 4096), (2, 3, 9001)])   # one, exactly one, three blocks
def test_cross_entropy_matches_float64(impl, dtype, shape):
    x = _logits(shape, dtype, seed=1)
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(shape[-1], shape[:-1], generator=gen)
    labels.view(-1)[0] = 0                                # the first and last columns are targets too
    labels.view(-1)[-1] = shape[-1] - 1
    g = torch.rand(shape[:-1], generator=gen)
    ref, ref_grad = _reference64(x, labels, g)

    logits = x.clone().requires_grad_()
    losses = cross_entropy(logits * 1, labels, impl=impl)     # * 1: the in-place gradient lands in a temporary
    assert losses.dtype == torch.float32 and losses.shape == labels.shape
    _assert_loss_close(losses, ref, x)
    losses.backward(g)
    assert logits.grad.dtype == dtype
    _assert_grad_close(logits.grad, ref_grad, x)


def test_triton_and_torch_agree_and_the_gradient_overwrites_the_logits():
    x = _logits((6, 1000), torch.bfloat16, seed=3)
    labels = torch.randint(1000, (6,), generator=torch.Generator().manual_seed(4))
    out = {}
    for impl in IMPLS:
        logits = x.clone().requires_grad_()
        y = logits * 1
        losses = cross_entropy(y, labels, impl=impl)
        losses.sum().backward()
        assert torch.equal(y, logits.grad), impl      # the gradient is written over the logits
        out[impl] = losses, logits.grad
    _assert_loss_close(out["triton"][0], out["torch"][0], x)
    _assert_grad_close(out["triton"][1], out["torch"][1].double(), x)


def test_a_second_backward_is_refused():
    logits = torch.randn(4, 50, requires_grad=True)
    loss = cross_entropy(logits * 1, torch.arange(4)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"cross_entropy: backward ran twice \(retain_graph\); the first one "
                                           r"wrote the gradient over the saved logits"):
        loss.backward()


@pytest.mark.parametrize("logits,labels,kwargs,error,message", [
    (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long), {}, TypeError,
     "cross_entropy: logits must be a bf16/fp16/fp32 tensor, got torch.float64"),
    (torch.zeros(2, 3), torch.zeros(2), {}, TypeError,
     "cross_entropy: labels must be an int32/int64 tensor, got torch.float32"),
    (torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), {}, ValueError,
     "cross_entropy: labels must have the logits' shape without its last dim, got logits (2, 3) and labels (3,)"),
    (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), {"rank": 1, "ranks": 2}, ValueError,
     "cross_entropy: need 0 <= rank < ranks and an all_reduce exactly when ranks > 1, got rank 1, ranks 2, "
     "all_reduce None"),
])
def test_bad_arguments_are_refused(logits, labels, kwargs, error, message):
    with pytest.raises(error) as e:
        cross_entropy(logits, labels, **kwargs)
    assert str(e.value) == message


def _tp_worker(x, labels, g):
    """Each rank: the loss and gradient of its half of the vocabulary, per impl."""
    dist.init_process_group("gloo")
    rank, half = dist.get_rank(), x.shape[-1] // 2
    out = {}
    for impl in IMPLS:
        logits = x[..., rank * half:(rank + 1) * half].clone().requires_grad_()
        losses = cross_entropy(logits * 1, labels, rank=rank, ranks=2, impl=impl,
                               all_reduce=functools.partial(dist.all_reduce, group=dist.group.WORLD))
        losses.backward(g)
        out[impl] = losses.detach(), logits.grad
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocabulary_split_over_two_ranks_matches_one_process_and_float64(dtype):
    x = _logits((3, 8, 600), dtype, seed=5)
    gen = torch.Generator().manual_seed(6)
    labels = torch.randint(600, (3, 8), generator=gen)
    g = torch.rand(3, 8, generator=gen)
    ref, ref_grad = _reference64(x, labels, g)
    ranks = run_distributed(_tp_worker, 2, x, labels, g)
    for impl in IMPLS:
        (loss0, grad0), (loss1, grad1) = ranks[0][impl], ranks[1][impl]
        assert torch.equal(loss0, loss1), impl                # the same loss on every rank
        _assert_loss_close(loss0, ref, x)
        _assert_grad_close(torch.cat([grad0, grad1], dim=-1), ref_grad, x)
        one = x.clone().requires_grad_()
        single = cross_entropy(one * 1, labels, impl=impl)
        single.backward(g)
        _assert_loss_close(loss0, single.detach(), x)
        _assert_grad_close(torch.cat([grad0, grad1], dim=-1), one.grad.double(), x)


def _lm_loss_worker(tp, logits, labels):
    """lm_loss (ours) and megatron-core's vocab_parallel_cross_entropy on logits.float() (before),
    on this rank's TP slice: the mean loss and the logits' gradient of each."""
    from megatron.core import parallel_state, tensor_parallel

    from model.gpt import lm_loss

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    rank, part = parallel_state.get_tensor_model_parallel_rank(), logits.shape[-1] // tp
    local = logits[..., rank * part:(rank + 1) * part]
    out = []
    for loss_fn in (lm_loss, lambda y, t: tensor_parallel.vocab_parallel_cross_entropy(
            y.float(), t.t().contiguous()).mean()):
        x = local.clone().requires_grad_()
        loss = loss_fn(x * 1, labels)
        loss.backward()
        out.append((loss.detach(), x.grad))
    parallel_state.destroy_model_parallel()
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_lm_loss_matches_megatron_vocab_parallel_cross_entropy(tp):
    s, b, v = 16, 3, 512
    logits = _logits((s, b, v), torch.bfloat16, seed=7)
    labels = torch.randint(v, (b, s), generator=torch.Generator().manual_seed(8))
    for (ours, ours_grad), (megatron, megatron_grad) in run_distributed(_lm_loss_worker, tp, tp, logits, labels):
        _assert_loss_close(ours, megatron, logits)
        _assert_grad_close(ours_grad, megatron_grad.double(), logits)
