"""trainer.lamb.Lamb against a float64 oracle of DeepSpeed FusedLamb's rule, resume, and FusedLamb itself on CUDA."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from trainer.lamb import Lamb
from trainer.optim import build_optimizer, param_groups


def oracle_step(p, g, m, v, t, *, lr, b1, b2, eps, wd, bias_correction, eps_inside_sqrt, max_coeff, min_coeff):
    """One step of FusedLamb's kernel rule on float64 numpy arrays; returns (p, m, v, trust ratio)."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v + eps) if eps_inside_sqrt else np.sqrt(v) + eps
    u = m / denom + wd * p
    w_norm, u_norm = math.sqrt(float(np.sum(p * p))), math.sqrt(float(np.sum(u * u)))
    r = 1.0
    if w_norm != 0 and u_norm != 0:
        r = w_norm / u_norm
        r = max_coeff if r > max_coeff else r
        r = min_coeff if r < min_coeff else r
    eta = lr * math.sqrt(1 - b2**t) / (1 - b1**t) if bias_correction else lr
    return p - eta * r * u, m, v, r


# name: (shape, weight scale, grad scale, decayed?). Trust ratio ~ weight scale / ~3 per element at step 1.
PARAMS = {
    "w": ((6, 5), 1.0, 1.0, True),  # ordinary matrix, decayed
    "big": ((4, 4), 300.0, 1.0, True),  # ||p|| / ||u|| >> max_coeff: clamps at max_coeff
    "tiny": ((3, 7), 1e-4, 1.0, True),  # ||p|| / ||u|| << min_coeff: clamps at min_coeff
    "b": ((9,), 1.0, 1.0, False),  # 1-d, no decay
    "small_grad": ((11,), 0.5, 1e-5, False),  # v ~ eps^2 scale: eps placement matters
    "zero_grad": ((5,), 1.0, 0.0, False),  # g == 0 always: ||u|| == 0, ratio 1, p unchanged
}


def _params_and_grads(steps: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(shape, generator=gen, dtype=torch.float64) * ws for k, (shape, ws, _, _) in PARAMS.items()}
    grads = [
        {k: torch.randn(shape, generator=gen, dtype=torch.float64) * gs for k, (shape, _, gs, _) in PARAMS.items()}
        for _ in range(steps)
    ]
    return params, grads


def _lamb(params: dict[str, nn.Parameter], wd: float, **kw) -> Lamb:
    groups = [
        {"params": [params[k] for k, spec in PARAMS.items() if spec[3]], "weight_decay": wd},
        {"params": [params[k] for k, spec in PARAMS.items() if not spec[3]], "weight_decay": 0.0},
    ]
    return Lamb(groups, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(bias_correction=False),
        dict(eps_inside_sqrt=True, eps=1e-6),
        dict(bias_correction=False, eps=1e-6, max_coeff=2.0, min_coeff=0.1, betas=(0.8, 0.99)),
    ],
    ids=["defaults", "no_bias_correction", "eps_inside_sqrt", "custom"],
)
def test_matches_float64_oracle(kw: dict) -> None:
    steps, wd, lr = 5, 0.05, 0.02
    init, grads = _params_and_grads(steps)
    params = {k: nn.Parameter(x.float()) for k, x in init.items()}
    opt = _lamb(params, wd, lr=lr, **kw)
    o = dict(
        lr=lr,
        b1=kw.get("betas", (0.9, 0.999))[0],
        b2=kw.get("betas", (0.9, 0.999))[1],
        eps=kw.get("eps", 1e-8),
        bias_correction=kw.get("bias_correction", True),
        eps_inside_sqrt=kw.get("eps_inside_sqrt", False),
        max_coeff=kw.get("max_coeff", 10.0),
        min_coeff=kw.get("min_coeff", 0.01),
    )
    # The oracle steps from the same fp32-rounded start, in float64.
    ref = {k: (x.float().double().numpy(), np.zeros(x.shape), np.zeros(x.shape)) for k, x in init.items()}
    order = [k for k, s in PARAMS.items() if s[3]] + [k for k, s in PARAMS.items() if not s[3]]
    for t in range(1, steps + 1):
        for k, p in params.items():
            p.grad = grads[t - 1][k].float()
        opt.step()
        ratios = {}
        for k in order:
            p, m, v = ref[k]
            g = grads[t - 1][k].float().double().numpy()
            p, m, v, ratios[k] = oracle_step(p, g, m, v, t, wd=wd if PARAMS[k][3] else 0.0, **o)
            ref[k] = (p, m, v)
        for k in order:
            expected = torch.from_numpy(ref[k][0]).float()
            atol = 1e-6 * float(expected.abs().max())
            torch.testing.assert_close(params[k].detach(), expected, rtol=2e-5, atol=atol, msg=f"{k} at step {t}")
        got = dict(zip(order, opt.get_lamb_coeffs()))
        assert got == pytest.approx(ratios, rel=1e-5)
        # The cases the parameter set is built to reach, reached.
        assert got["big"] == pytest.approx(o["max_coeff"], rel=1e-7)  # fp32 copies of the bounds
        assert got["tiny"] == pytest.approx(o["min_coeff"], rel=1e-7)
        assert got["zero_grad"] == 1.0
    assert torch.equal(params["zero_grad"].detach(), init["zero_grad"].float())  # g == 0, wd == 0: untouched


def test_weight_decay_is_per_group() -> None:
    init, grads = _params_and_grads(1)
    a = {k: nn.Parameter(x.float()) for k, x in init.items()}
    b = {k: nn.Parameter(x.float()) for k, x in init.items()}
    for ps in (a, b):
        for k, p in ps.items():
            p.grad = grads[0][k].float()
    _lamb(a, 0.5).step()
    _lamb(b, 0.0).step()
    assert not torch.equal(a["w"], b["w"])  # decayed group feels weight_decay
    assert torch.equal(a["b"], b["b"])  # the 0-decay group does not


def test_max_grad_norm_and_scale_divide_the_gradient() -> None:
    """FusedLamb's combined scale: grads / (scale * max(1, (norm / scale + 1e-6) / max_grad_norm))."""
    init, grads = _params_and_grads(1)
    scale, norm, max_norm = 4.0, 40.0, 2.0
    combined = scale * ((norm / scale + 1e-6) / max_norm)
    a = {k: nn.Parameter(x.float()) for k, x in init.items()}
    b = {k: nn.Parameter(x.float()) for k, x in init.items()}
    for k in init:
        a[k].grad = grads[0][k].float()
        b[k].grad = grads[0][k].float() / combined
    _lamb(a, 0.1, max_grad_norm=max_norm).step(scale=scale, grad_norms=[norm, norm])
    _lamb(b, 0.1).step()
    for k in init:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="grad_norms"):
        _lamb(a, 0.1, max_grad_norm=max_norm).step()


def test_amsgrad_rejected() -> None:
    with pytest.raises(RuntimeError, match="AMSGrad"):
        Lamb([nn.Parameter(torch.randn(3))], amsgrad=True)


def test_state_dict_round_trip_is_bitwise() -> None:
    init, grads = _params_and_grads(6, seed=3)

    def run(params, opt, ts):
        for t in ts:
            for k, p in params.items():
                p.grad = grads[t][k].float()
            opt.step()

    straight = {k: nn.Parameter(x.float()) for k, x in init.items()}
    run(straight, _lamb(straight, 0.05, lr=0.01), range(6))

    first = {k: nn.Parameter(x.float()) for k, x in init.items()}
    opt = _lamb(first, 0.05, lr=0.01)
    run(first, opt, range(3))
    saved = copy.deepcopy(opt.state_dict())
    resumed = {k: nn.Parameter(p.detach().clone()) for k, p in first.items()}
    opt2 = _lamb(resumed, 0.05, lr=0.01)
    opt2.load_state_dict(saved)
    run(resumed, opt2, range(3, 6))
    for k in init:
        assert torch.equal(resumed[k], straight[k]), k
    assert opt2.state[resumed["w"]]["step"] == 6


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def test_build_optimizer_lamb_on_cpu() -> None:
    model = _model()
    opt = build_optimizer(model, "lamb", 2e-3, 0.1, (0.9, 0.98), 1e-6, device="cpu")
    assert isinstance(opt, Lamb)
    expected = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in expected]
    for got, want in zip(opt.param_groups, expected):
        assert [id(p) for p in got["params"]] == [id(p) for p in want["params"]]
        assert got["lr"] == 2e-3 and got["betas"] == (0.9, 0.98) and got["eps"] == 1e-6
    assert isinstance(build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.98), 1e-8), torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown optimizer 'lamb2'"):
        build_optimizer(model, "lamb2", 1e-3, 0.1, (0.9, 0.98), 1e-8)


def _fused_lamb_buildable() -> bool:
    if not torch.cuda.is_available():
        return False
    from deepspeed.ops.op_builder import FusedLambBuilder

    return FusedLambBuilder().is_compatible()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FusedLamb is a CUDA op")
@pytest.mark.parametrize("kw", [dict(), dict(bias_correction=False, eps_inside_sqrt=True, eps=1e-6)], ids=["defaults", "variant"])
def test_matches_deepspeed_fused_lamb_on_cuda(kw: dict) -> None:
    if not _fused_lamb_buildable():
        pytest.skip("DeepSpeed reports its fused_lamb op incompatible with this CUDA setup")
    from deepspeed.ops.lamb import FusedLamb

    init, grads = _params_and_grads(4, seed=5)
    ours = {k: nn.Parameter(x.float().cuda()) for k, x in init.items()}
    theirs = {k: nn.Parameter(x.float().cuda()) for k, x in init.items()}
    opt = _lamb(ours, 0.05, lr=0.02, **kw)
    groups = [
        {"params": [theirs[k] for k, s in PARAMS.items() if s[3]], "weight_decay": 0.05},
        {"params": [theirs[k] for k, s in PARAMS.items() if not s[3]], "weight_decay": 0.0},
    ]
    ref = FusedLamb(groups, lr=0.02, **kw)
    for step in grads:
        for ps in (ours, theirs):
            for k, p in ps.items():
                p.grad = step[k].float().cuda()
        opt.step()
        ref.step()
        assert opt.get_lamb_coeffs() == pytest.approx(ref.get_lamb_coeffs(), rel=1e-5)
    for k in init:
        atol = 1e-6 * float(theirs[k].abs().max())
        torch.testing.assert_close(ours[k], theirs[k], rtol=2e-5, atol=atol, msg=k)
