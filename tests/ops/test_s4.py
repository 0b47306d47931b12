"""S4D: recurrence == direct convolution == FFT convolution (ZOH and bilinear, S4D-Lin and
S4D-Real), fast path vs fp64 reference with gradients, discretization properties, and the links
to Mamba's selective scan (LTI reduction, Theorem 1 of the Mamba paper)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssmkit.ops import s4
from tests.helpers import assert_close, backend_params

BACKENDS = backend_params("ssmkit.ops.s4")
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
KINDS = ["lin", "real"]


def _params(kind: str, H: int, N: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Real fp64 leaves of an S4D layer (how a module parametrises it), near the standard inits."""
    f64 = dict(device=device, dtype=torch.float64)
    log_dt = torch.empty(H, **f64).uniform_(math.log(1e-3), math.log(1e-1))
    if kind == "lin":
        A = s4.s4d_lin_init(H, N, dtype=torch.complex128, device=device)
        modes = A.shape[1]
        return dict(
            log_A_real=torch.log(-A.real) + 0.1 * torch.randn(H, modes, **f64),
            A_imag=A.imag + 0.1 * torch.randn(H, modes, **f64),
            B_re=1 + 0.1 * torch.randn(H, modes, **f64),
            B_im=0.1 * torch.randn(H, modes, **f64),
            C_re=torch.randn(H, modes, **f64) * 0.5**0.5,
            C_im=torch.randn(H, modes, **f64) * 0.5**0.5,
            log_dt=log_dt,
            D=torch.randn(H, **f64),
        )
    _, A_log = s4.s4d_real_init(H, N, dtype=torch.float64, device=device)
    return dict(
        A_log=A_log + 0.1 * torch.randn(H, N, **f64),
        B=1 + 0.1 * torch.randn(H, N, **f64),
        C=torch.randn(H, N, **f64) / N**0.5,
        log_dt=log_dt,
        D=torch.randn(H, **f64),
    )


def _ssm(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(A, B, C, dt, D) from the leaves; A = -exp(log_A_real) + i A_imag or -exp(A_log)."""
    if "A_imag" in p:
        A = torch.complex(-torch.exp(p["log_A_real"]), p["A_imag"])
        B, C = torch.complex(p["B_re"], p["B_im"]), torch.complex(p["C_re"], p["C_im"])
    else:
        A, B, C = -torch.exp(p["A_log"]), p["B"], p["C"]
    return A, B, C, torch.exp(p["log_dt"]), p["D"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", s4.METHODS)
def test_recurrent_equals_direct_and_fft_convolution(kind, method, device):
    """Three forms of the same LTI system in fp64: recurrence, direct convolution with the
    Vandermonde kernel, FFT convolution with the same kernel."""
    H, N, L = 3, 14 if kind == "lin" else 13, 37
    A, B, C, dt, D = _ssm(_params(kind, H, N, device))
    u = torch.randn(2, H, L, device=device, dtype=torch.float64)
    recurrent = s4.s4d_recurrent(u, A, B, C, dt, D, method=method)
    K = s4.s4d_kernel(A, B, C, dt, L, method=method)
    assert K.shape == (H, L) and K.dtype == torch.float64
    assert_close(s4.s4d_conv(u, K, D), recurrent, torch.float64, name="direct convolution")
    assert_close(s4.fft_conv(u, K, D), recurrent, torch.float64, name="FFT convolution")


def _as_real(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors compare as (real, imag) pairs: the relative-error helper works on real ones."""
    return torch.view_as_real(t) if t.is_complex() else t


_WIDE = {torch.float32: torch.float64, torch.complex64: torch.complex128}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", s4.METHODS)
def test_forward_matches_recurrence(backend, dtype, kind, method, device):
    """s4d_forward's fast path (kernel + FFT) vs autograd through the fp64 recurrence: output and
    gradients to u, A, B, C, dt and D. u carries the dtype; the SSM parameters stay fp32 /
    complex64 (fp64 / complex128 in the fp64 case), as in a mixed-precision model."""
    H, N, L = 3, 14 if kind == "lin" else 13, 29
    ssm = _ssm(_params(kind, H, N, device))
    if dtype != torch.float64:
        ssm = tuple(t.to(torch.complex64 if t.is_complex() else torch.float32) for t in ssm)
    leaves = [t.detach().requires_grad_() for t in ssm]
    truth = [t.detach().to(_WIDE.get(t.dtype, t.dtype)).requires_grad_() for t in leaves]
    u = torch.randn(2, H, L, device=device).to(dtype).requires_grad_()
    u64 = u.detach().double().requires_grad_()

    y = s4.s4d_forward(u, *leaves, method=method, backend=backend)
    expected = s4.s4d_forward(u64, *truth, method=method, backend="reference")
    assert y.dtype == dtype
    assert_close(y, expected, dtype, name="y")

    grad_y = torch.randn_like(expected).to(dtype)
    grads = torch.autograd.grad(y, [u, *leaves], grad_y)
    expected_grads = torch.autograd.grad(expected, [u64, *truth], grad_y.double())
    for name, grad, expected_grad in zip(["u", "A", "B", "C", "dt", "D"], grads, expected_grads):
        # Parameter gradients sum over batch and time; dt's, through dA^l, is the least well
        # conditioned (the fp32 recurrence is off by as much as the FFT path).
        scale = 1.0 if name == "u" else 3.0
        assert_close(_as_real(grad), _as_real(expected_grad), dtype, scale=scale, name=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", s4.METHODS)
@pytest.mark.parametrize("length", [0, 1, 2, 16, 37, 200])
def test_factored_kernel_equals_vandermonde(backend, kind, method, length, device):
    """The fast path's factored kernel (l = q M + r) equals the plain Vandermonde sum, for lengths
    that are and are not perfect squares."""
    A, B, C, dt, _ = _ssm(_params(kind, 3, 14 if kind == "lin" else 13, device))
    expected = s4.s4d_kernel(A, B, C, dt, length, method, backend="reference")
    K = s4.s4d_kernel(A, B, C, dt, length, method, backend=backend)
    assert K.shape == expected.shape == (3, length)
    if length:
        assert_close(K, expected, torch.float64)
    lowered = [t.to(torch.complex64 if t.is_complex() else torch.float32) for t in (A, B, C, dt)]
    if length:
        assert_close(
            s4.s4d_kernel(*lowered, length, method, backend=backend), expected, torch.float32, scale=2.0
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", s4.METHODS)
def test_factored_kernel_long_and_decayed(kind, method, device):
    """Long kernels whose slow modes decay over thousands of steps and whose fast modes underflow
    (|dA|^l far below the smallest normal number, where the fast path floors the powers): the
    factored kernel still equals the Vandermonde sum, in fp64 and in fp32, and its gradients
    are finite and match the reference's."""
    H, N, length = 4, 14 if kind == "lin" else 13, 3001
    p = _params(kind, H, N, device)
    p["log_dt"] = torch.linspace(math.log(1e-3), math.log(2.0), H, device=device, dtype=torch.float64)
    leaves = {name: value.detach().requires_grad_() for name, value in p.items() if name != "D"}
    leaves["D"] = p["D"]  # D does not enter the kernel
    A, B, C, dt, _ = _ssm(leaves)
    expected = s4.s4d_kernel(A, B, C, dt, length, method, backend="reference")
    K = s4.s4d_kernel(A, B, C, dt, length, method, backend="torch")
    assert_close(K, expected, torch.float64)
    with torch.no_grad():  # the path without autograd (computed in place) gives the same kernel
        assert_close(s4.s4d_kernel(A, B, C, dt, length, method, backend="torch"), K, torch.float64)
    weights = torch.randn_like(expected)
    names = [name for name in leaves if name != "D"]
    grads = torch.autograd.grad((K * weights).sum(), [leaves[n] for n in names], retain_graph=True)
    expected_grads = torch.autograd.grad((expected * weights).sum(), [leaves[n] for n in names])
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        assert_close(grad, expected_grad, torch.float64, name=f"grad {name}")
    lowered = [t.detach().to(torch.complex64 if t.is_complex() else torch.float32) for t in (A, B, C, dt)]
    K32 = s4.s4d_kernel(*lowered, length, method, backend="torch")
    assert_close(K32, expected, torch.float32, scale=3.0)


@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_state_chaining(kind, device):
    """Running two halves with the state carried over equals one pass; the returned state is the
    last one."""
    H, N, L = 2, 6, 20
    A, B, C, dt, D = _ssm(_params(kind, H, N, device))
    u = torch.randn(3, H, L, device=device, dtype=torch.float64)
    whole, last = s4.s4d_recurrent(u, A, B, C, dt, D, return_state=True)
    first, carried = s4.s4d_recurrent(u[..., :7], A, B, C, dt, D, return_state=True)
    second, final = s4.s4d_recurrent(u[..., 7:], A, B, C, dt, D, initial_state=carried, return_state=True)
    assert_close(torch.cat([first, second], dim=-1), whole, torch.float64, name="y")
    assert_close(_as_real(final), _as_real(last), torch.float64, name="state")
    assert last.is_complex() == (kind == "lin")


@pytest.mark.parametrize("kind", KINDS)
def test_zoh_is_exact_for_constant_input(kind, device):
    """ZOH samples the continuous system exactly under piecewise-constant input: for u = 1 from a
    zero state, y(t) = C B / A (exp(A t) - 1) (2 Re for complex A) at t = k dt."""
    H, N, L = 2, 8, 25
    A, B, C, dt, _ = _ssm(_params(kind, H, N, device))
    dt = dt * 10  # coarse steps: exactness must not rely on dt being small
    u = torch.ones(1, H, L, device=device, dtype=torch.float64)
    y = s4.s4d_recurrent(u, A, B, C, dt)
    t = dt[:, None] * torch.arange(1, L + 1, device=device, dtype=torch.float64)  # (H, L)
    exact = (C * B / A)[:, :, None] * (torch.exp(A[:, :, None] * t[:, None, :]) - 1)
    exact = exact.sum(dim=1)
    exact = 2 * exact.real if exact.is_complex() else exact
    assert_close(y[0], exact, torch.float64)


def test_discretization_formulas(device):
    A = torch.tensor([[-0.5 + 2.0j, -3.0 + 0.0j]], dtype=torch.complex128, device=device)
    B = torch.tensor([[1.0 + 0.5j, 2.0 + 0.0j]], dtype=torch.complex128, device=device)
    dt = torch.tensor([0.1], dtype=torch.float64, device=device)
    dA, dB = s4.discretize_zoh(A, B, dt)
    assert torch.allclose(dA, torch.exp(0.1 * A)) and torch.allclose(dB, (torch.exp(0.1 * A) - 1) / A * B)
    dA, dB = s4.discretize_bilinear(A, B, dt)
    assert torch.allclose(dA, (1 + 0.05 * A) / (1 - 0.05 * A)) and torch.allclose(
        dB, 0.1 * B / (1 - 0.05 * A)
    )
    # Bilinear is the (1, 1) Pade approximant of exp: its error is O(dt^3), so halving dt divides it by ~8.
    errors = [
        (s4.discretize_bilinear(A, B, dt / 2**i)[0] - torch.exp(dt / 2**i * A)).abs().max() for i in (3, 4)
    ]
    assert 7.0 < float(errors[0] / errors[1]) < 9.0


def test_inits(device):
    A = s4.s4d_lin_init(3, 8, device=device)
    assert A.shape == (3, 4) and A.dtype == torch.complex64
    assert torch.allclose(A.real, torch.full((3, 4), -0.5, device=device))
    assert torch.allclose(A.imag[1], math.pi * torch.arange(4.0, device=device))
    A, A_log = s4.s4d_real_init(2, 5, device=device)
    assert A.shape == A_log.shape == (2, 5)
    assert torch.equal(A[0], -torch.arange(1.0, 6.0, device=device)) and torch.allclose(A, -torch.exp(A_log))
    with pytest.raises(ValueError, match="N must be a positive even state size"):
        s4.s4d_lin_init(2, 7)
    with pytest.raises(TypeError, match="dtype must be complex64 or complex128"):
        s4.s4d_lin_init(2, 8, dtype=torch.float32)


@pytest.mark.parametrize("kernel_length", [5, 23, 40])
def test_fft_conv_matches_direct(kernel_length, device):
    """Kernels shorter than, equal to (odd L) and longer than the input."""
    u = torch.randn(2, 4, 23, device=device, dtype=torch.float64)
    K = torch.randn(4, kernel_length, device=device, dtype=torch.float64)
    D = torch.randn(4, device=device, dtype=torch.float64)
    assert_close(s4.fft_conv(u, K, D), s4.s4d_conv(u, K, D), torch.float64)
    assert_close(s4.fft_conv(u.float(), K.float()), s4.s4d_conv(u, K), torch.float32)


def test_selective_scan_lti_reduces_to_s4d(device):
    """selective_scan_fn with input-independent delta, B, C is an LTI S4D system with real A.

    The selective scan discretizes A by ZOH but B by Euler (dB = delta B); an S4D-Real ZOH
    recurrence has the same dB when its B is rescaled to B' = delta B A / (exp(delta A) - 1).
    """
    from ssmkit.ops import selective_scan_fn

    batch, dim, dstate, L = 2, 4, 5, 17
    f64 = dict(device=device, dtype=torch.float64)
    A = -torch.exp(torch.randn(dim, dstate, **f64) / 2)
    dt = torch.exp(torch.empty(dim, **f64).uniform_(math.log(1e-2), math.log(0.5)))
    B_shared, C_shared = torch.randn(dstate, **f64), torch.randn(dstate, **f64)
    D = torch.randn(dim, **f64)
    u = torch.randn(batch, dim, L, **f64)
    delta = dt[None, :, None].expand(batch, dim, L)
    B = B_shared[None, :, None].expand(batch, dstate, L)
    C = C_shared[None, :, None].expand(batch, dstate, L)
    y, last_state = selective_scan_fn(u, delta, A, B, C, D, return_last_state=True, backend="reference")

    dtA = dt[:, None] * A
    B_s4 = dt[:, None] * B_shared * A / torch.expm1(dtA)
    C_s4 = C_shared.expand(dim, dstate)
    expected, state = s4.s4d_recurrent(u, A, B_s4, C_s4, dt, D, method="zoh", return_state=True)
    assert_close(y, expected, torch.float64, name="y")
    assert_close(last_state, state, torch.float64, name="last state")
    assert_close(s4.s4d_forward(u, A, B_s4, C_s4, dt, D, backend="torch"), y, torch.float64, name="FFT form")


def test_mamba_theorem_1_gating(device):
    """Mamba paper, Theorem 1: with N = 1, A = -1, B = 1 and delta = softplus(w x + b), the
    selective SSM is the gated recurrence h_t = (1 - g_t) h_{t-1} + g_t x_t, g_t = sigmoid(w x_t + b).

    The theorem uses ZOH for B; selective_scan_fn uses Euler (delta B), so B_t is passed as the
    ZOH factor (1 - exp(-delta_t)) / delta_t, which is input-dependent, as B is in a selective SSM.
    One group per channel gives each channel its own B_t; C = 1 makes y the hidden state.
    """
    from ssmkit.ops import selective_scan_fn

    batch, dim, L = 2, 3, 23
    f64 = dict(device=device, dtype=torch.float64)
    x = torch.randn(batch, dim, L, **f64)
    w, b = torch.randn(dim, **f64), torch.randn(dim, **f64)
    delta = F.softplus(w[:, None] * x + b[:, None])
    B = (-torch.expm1(-delta) / delta).unsqueeze(2)  # (batch, ngroups = dim, dstate = 1, L)
    C = torch.ones(batch, dim, 1, L, **f64)
    A = -torch.ones(dim, 1, **f64)
    y = selective_scan_fn(x, w[:, None] * x, A, B, C, delta_bias=b, delta_softplus=True, backend="reference")

    gate = torch.sigmoid(w[:, None] * x + b[:, None])
    h = torch.zeros(batch, dim, **f64)
    expected = []
    for t in range(L):
        h = (1 - gate[..., t]) * h + gate[..., t] * x[..., t]
        expected.append(h)
    assert_close(y, torch.stack(expected, dim=-1), torch.float64)


def _ok() -> dict:
    A, B, C, dt = -torch.ones(3, 4), torch.ones(3, 4), torch.ones(3, 4), torch.ones(3)
    return dict(u=torch.ones(2, 3, 10), A=A, B=B, C=C, dt=dt)


@pytest.mark.parametrize(
    "fn, change, error, message",
    [
        (
            s4.s4d_forward,
            dict(u=torch.ones(2, 4, 10)),
            ValueError,
            r"u must have shape \(batch, H, L\) = \(\?, 3, \?\)",
        ),
        (
            s4.s4d_forward,
            dict(B=torch.ones(3, 5)),
            ValueError,
            r"B must have shape \(H, N\) = \(3, 4\), got \(3, 5\)",
        ),
        (
            s4.s4d_forward,
            dict(C=torch.ones(3, 4, dtype=torch.complex64)),
            TypeError,
            "C must be real when A is real",
        ),
        (s4.s4d_forward, dict(dt=torch.ones(4)), ValueError, r"dt must have shape \(H\) = \(3,\)"),
        (
            s4.s4d_forward,
            dict(dt=torch.ones(3, dtype=torch.complex64)),
            TypeError,
            "dt must have a floating dtype",
        ),
        (s4.s4d_forward, dict(D=torch.ones(2)), ValueError, r"D must have shape \(H\) = \(3,\)"),
        (s4.s4d_forward, dict(method="euler"), ValueError, "method must be one of"),
        (s4.s4d_forward, dict(A=torch.ones(3)), ValueError, r"A must have shape \(H, N\)"),
        (
            s4.s4d_recurrent,
            dict(initial_state=torch.ones(2, 3, 5)),
            ValueError,
            r"initial_state must have shape",
        ),
        (s4.s4d_kernel, dict(length=-1), ValueError, "length must be a non-negative int"),
        (
            s4.fft_conv,
            dict(K=torch.ones(4, 10)),
            ValueError,
            r"u must have shape \(batch, H, L\) = \(\?, 4, \?\)",
        ),
        (s4.s4d_conv, dict(K=torch.ones(3)), ValueError, r"K must have shape \(H, L\)"),
        (
            s4.discretize_zoh,
            dict(A=torch.ones(3, 4, dtype=torch.int64)),
            TypeError,
            "A must have a floating dtype",
        ),
        (s4.discretize_bilinear, dict(dt=None), TypeError, "dt must be a torch.Tensor, got None"),
    ],
)
def test_bad_input(fn, change, error, message):
    args = _ok()
    args.update(change)
    if fn in (s4.fft_conv, s4.s4d_conv):
        args = dict(u=args["u"], K=args.get("K", torch.ones(3, 10)))
    elif fn in (s4.discretize_zoh, s4.discretize_bilinear):
        args = dict(A=args["A"], B=args["B"], dt=args["dt"])
    elif fn is s4.s4d_kernel:
        args = dict(A=args["A"], B=args["B"], C=args["C"], dt=args["dt"], length=args.get("length", 10))
    with pytest.raises(error, match=message):
        fn(**args)


def test_lin_system_is_ready_to_run() -> None:
    from ssmkit.ops.s4 import s4d_lin_system

    A, B, C, dt = s4d_lin_system(5, 8, generator=torch.Generator().manual_seed(0))
    assert A.shape == B.shape == C.shape == (5, 4) and dt.shape == (5,)
    assert bool(((dt >= 0.001) & (dt <= 0.1)).all()) and bool((A.real < 0).all())
    u = torch.randn(2, 5, 33)
    torch.testing.assert_close(
        s4.s4d_forward(u, A, B, C, dt, backend="torch"),
        s4.s4d_forward(u, A, B, C, dt, backend="reference"),
        rtol=1e-4,
        atol=1e-4,
    )
