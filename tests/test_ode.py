"""ODE decoders (lightning_mem.ode): Jacobians against closed forms, finite differences, autograd through the solver
and Liouville's formula; the metrics and the callback on an ODE decoder; the flow-matching example."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from conftest import H0, linear_closed_form
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mem import ManifoldEntropicMetricsCallback, decoder_jacobian
from lightning_mem.functional import manifold_entropy, manifold_pairwise_mutual_information, manifold_total_correlation
from lightning_mem.ode import ODEDecoder, ode_decoder_jacobian

torchdiffeq = pytest.importorskip("torchdiffeq")

F64 = torch.float64
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ENGINE_FALLBACK = "ignore:torch.func could not trace the decoder:RuntimeWarning"
"""Until the engine asks an ODEDecoder for its own Jacobian, mode="auto" falls back to a plain-autograd loop (with this warning)."""


def _matrix(d: int, seed: int, scale: float = 0.6) -> torch.Tensor:
    return scale * torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _latents(n: int, d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


class MLPVelocity(nn.Module):
    """A smooth, time-dependent, non-linear velocity field ``v(t, x)`` (float64)."""

    def __init__(self, d: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d + 1, 24), nn.Tanh(), nn.Linear(24, d)).to(F64)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t.reshape(1, 1).expand(x.shape[0], 1)], dim=1))


def _taylor(a: torch.Tensor, order: int) -> torch.Tensor:
    """``sum_{k <= order} a^k / k!``: one step of an explicit Runge-Kutta method of that order on a linear ODE."""
    term = result = torch.eye(a.shape[0], dtype=a.dtype)
    for k in range(1, order + 1):
        term = term @ a / k
        result = result + term
    return result


# ------------------------------------------------------------------ closed forms: the linear ODE


@pytest.mark.parametrize(("t0", "t1"), [(0.0, 1.0), (0.5, 2.0), (1.0, 0.0)])
def test_adaptive_jacobian_of_a_linear_ode_is_the_matrix_exponential(t0, t1):
    a = _matrix(4, seed=0)
    decoder = ODEDecoder(lambda t, x: x @ a.T, t0=t0, t1=t1, rtol=1e-11, atol=1e-12)
    z = _latents(5, 4)
    truth = torch.linalg.matrix_exp(a * (t1 - t0))
    jacobian = decoder.decoder_jacobian(z)
    assert jacobian.shape == (5, 4, 4) and jacobian.dtype == F64
    torch.testing.assert_close(jacobian, truth.expand(5, 4, 4), rtol=0, atol=1e-9)
    torch.testing.assert_close(decoder(z), z @ truth.T, rtol=0, atol=1e-9)


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_fixed_step_jacobian_is_the_derivative_of_the_discrete_solver_map(method, order):
    # On dx/dt = A x one step of an explicit RK method of order p is x <- T_p(hA) x (the Taylor polynomial), so
    # n steps give the closed form T_p(hA)^n: the tangent ODE reproduces it to rounding, not just to O(h^p).
    a, h, steps = _matrix(3, seed=1), 0.05, 40
    decoder = ODEDecoder(lambda t, x: x @ a.T, t1=h * steps, method=method, options={"step_size": h})
    truth = torch.linalg.matrix_power(_taylor(h * a, order), steps)
    jacobian = decoder.decoder_jacobian(_latents(3, 3))
    torch.testing.assert_close(jacobian, truth.expand(3, 3, 3), rtol=0, atol=1e-12)
    assert (jacobian[0] - torch.linalg.matrix_exp(a * h * steps)).abs().max() > 1e-10  # the discrete map, not the flow


@pytest.mark.filterwarnings(ENGINE_FALLBACK)
def test_metrics_of_a_linear_ode_decoder_equal_those_of_its_matrix_exponential():
    a = _matrix(4, seed=2)
    decoder = ODEDecoder(lambda t, x: x @ a.T, rtol=1e-11, atol=1e-12)
    jacobian = decoder_jacobian(decoder, _latents(16, 4), chunk_size=5)
    truth = linear_closed_form(torch.linalg.matrix_exp(a))
    latent_entropy, entropy = manifold_entropy(jacobian)
    torch.testing.assert_close(latent_entropy, truth["entropy_per_dim"], rtol=0, atol=1e-8)
    torch.testing.assert_close(entropy, truth["entropy"], rtol=0, atol=1e-8)
    # a linear flow map has log det expm(A) = trace(A): Liouville's formula
    torch.testing.assert_close(entropy, torch.tensor(4 * H0 + float(a.trace()), dtype=F64), rtol=0, atol=1e-8)
    torch.testing.assert_close(manifold_total_correlation(jacobian), truth["total_correlation"], rtol=0, atol=1e-8)
    torch.testing.assert_close(manifold_pairwise_mutual_information(jacobian), truth["pairwise_mutual_information"], rtol=0, atol=1e-8)


def test_conditional_velocity_gets_each_samples_condition():
    a = _matrix(3, seed=3)
    rates = torch.tensor([[0.5], [-1.0], [2.0]], dtype=F64)
    decoder = ODEDecoder(lambda t, x, c: c * (x @ a.T), rtol=1e-11, atol=1e-12)
    jacobian = decoder.decoder_jacobian(_latents(3, 3), rates)
    for n in range(3):
        torch.testing.assert_close(jacobian[n], torch.linalg.matrix_exp(rates[n] * a), rtol=0, atol=1e-9)


# -------------------------------------------------------- non-linear fields: independent derivatives


def test_adaptive_jacobian_matches_central_finite_differences():
    velocity = MLPVelocity(3)
    decoder = ODEDecoder(velocity, rtol=1e-12, atol=1e-12)
    z = _latents(4, 3)
    jacobian = decoder.decoder_jacobian(z)
    step = 1e-5
    with torch.no_grad():
        columns = [(decoder(z + step * e) - decoder(z - step * e)) / (2 * step) for e in torch.eye(3, dtype=F64)]
    torch.testing.assert_close(jacobian, torch.stack(columns, dim=-1), rtol=0, atol=1e-7)


def test_rk4_jacobian_equals_autograd_through_the_solver():
    velocity = MLPVelocity(3, seed=1)
    decoder = ODEDecoder(velocity, method="rk4", options={"step_size": 0.1})
    z = _latents(3, 3)
    truth = torch.stack([torch.autograd.functional.jacobian(lambda v: decoder(v[None])[0], z_n) for z_n in z])
    torch.testing.assert_close(decoder.decoder_jacobian(z), truth, rtol=0, atol=1e-12)


def test_log_determinant_follows_liouvilles_formula():
    # d/dt log|det J| = trace(dv/dx)(t, x(t)): integrated here with the trace from autograd, sample by sample
    velocity = MLPVelocity(3, seed=2)
    z = _latents(3, 3)

    def augmented(t, state):
        x, _ = state
        traces = torch.stack([torch.autograd.functional.jacobian(lambda v: velocity(t, v[None])[0], x_n).trace() for x_n in x])
        return velocity(t, x), traces

    with torch.no_grad():
        _, log_det = torchdiffeq.odeint(
            augmented, (z, torch.zeros(3, dtype=F64)), torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-11, atol=1e-12
        )
    jacobian = ode_decoder_jacobian(velocity, z, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(torch.linalg.slogdet(jacobian).logabsdet, log_det[-1], rtol=0, atol=1e-8)


def test_encode_inverts_decode_and_its_jacobian_is_the_inverse():
    velocity = MLPVelocity(3, seed=3)
    decoder = ODEDecoder(velocity, rtol=1e-11, atol=1e-12)
    z = _latents(4, 3)
    with torch.no_grad():
        x = decoder(z)
    torch.testing.assert_close(decoder.encode(x), z, rtol=0, atol=1e-8)
    backwards = ode_decoder_jacobian(velocity, x, t0=1.0, t1=0.0, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(backwards @ decoder.decoder_jacobian(z), torch.eye(3, dtype=F64).expand(4, 3, 3), rtol=0, atol=1e-8)


def test_chunks_equal_one_solve_and_float32_is_close_to_float64():
    velocity = MLPVelocity(3, seed=4)
    z = _latents(7, 3)
    whole = ode_decoder_jacobian(velocity, z, rtol=1e-10, atol=1e-10)
    # Adaptive steps are shared by a chunk's samples, so chunks agree to the tolerance (not bit for bit).
    torch.testing.assert_close(ode_decoder_jacobian(velocity, z, chunk_size=3, rtol=1e-10, atol=1e-10), whole, rtol=0, atol=1e-8)
    single = ode_decoder_jacobian(velocity.float(), z.float(), rtol=1e-6, atol=1e-6)
    velocity.double()
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), whole, rtol=0, atol=1e-4)


def test_gradient_of_the_log_determinant_through_the_tangent_ode():
    # log det expm(A) = trace(A), so its gradient in A is the identity
    a = _matrix(3, seed=5).requires_grad_(True)
    jacobian = ode_decoder_jacobian(lambda t, x: x @ a.T, _latents(2, 3), rtol=1e-10, atol=1e-10, create_graph=True)
    (gradient,) = torch.autograd.grad(torch.linalg.slogdet(jacobian).logabsdet.mean(), a)
    torch.testing.assert_close(gradient, torch.eye(3, dtype=F64), rtol=0, atol=1e-7)
    assert not ode_decoder_jacobian(lambda t, x: x @ a.T, _latents(2, 3)).requires_grad


def test_velocity_vmap_cannot_trace_falls_back_to_a_loop_with_one_warning():
    a = _matrix(3, seed=6)

    def velocity(t, x):
        return x @ a.T + 0.0 * torch.randn(x.shape, dtype=x.dtype)  # a random draw: vmap refuses it

    with pytest.warns(RuntimeWarning, match="loop of 3 JVPs") as record:
        jacobian = ode_decoder_jacobian(velocity, _latents(2, 3), rtol=1e-10, atol=1e-11)
    assert sum("loop of 3 JVPs" in str(warning.message) for warning in record) == 1
    torch.testing.assert_close(jacobian, torch.linalg.matrix_exp(a).expand(2, 3, 3), rtol=0, atol=1e-8)


def test_sampled_columns_are_the_full_jacobians_columns():
    velocity = MLPVelocity(3, seed=9)
    decoder = ODEDecoder(velocity, rtol=1e-11, atol=1e-12)
    z = _latents(4, 3)
    columns = torch.tensor([[2, 0], [1, 1], [0, 2], [2, 1]])
    sampled = decoder.decoder_jacobian_columns(z, columns)
    full = decoder.decoder_jacobian(z)
    assert sampled.shape == (4, 3, 2)
    torch.testing.assert_close(sampled, torch.stack([full[n][:, columns[n]] for n in range(4)]), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match=r"integers in \[0, 3\)"):
        decoder.decoder_jacobian_columns(z, columns + 1)


# --------------------------------------------------------------------------------- adjoint


def test_adjoint_decoder_trains_by_the_adjoint_and_its_jacobian_comes_from_the_tangent_ode():
    velocity = MLPVelocity(3, seed=7)
    plain = ODEDecoder(velocity, rtol=1e-10, atol=1e-10)
    adjoint = ODEDecoder(velocity, rtol=1e-10, atol=1e-10, adjoint=True)
    z = _latents(3, 3)
    torch.testing.assert_close(adjoint.decoder_jacobian(z), plain.decoder_jacobian(z), rtol=0, atol=1e-12)
    # the adjoint path gives the parameter gradients of backpropagation through the solver
    method = ODEDecoder(velocity.forward, rtol=1e-10, atol=1e-10, adjoint=True)  # a module's method: its parameters
    grads = []
    for decoder in (plain, adjoint, method):
        velocity.zero_grad()
        decoder(z).square().sum().backward()
        grads.append([p.grad.clone() for p in velocity.parameters()])
    for g_plain, g_adjoint, g_method in zip(*grads, strict=True):
        torch.testing.assert_close(g_adjoint, g_plain, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(g_method, g_plain, rtol=1e-6, atol=1e-8)


def test_odeint_adjoint_has_no_forward_mode():
    # A decoder of one's own that calls odeint_adjoint: forward mode fails in torch (documented in lightning_mem.ode),
    # reverse mode works (one adjoint solve per output entry) and equals the tangent ODE.
    velocity = MLPVelocity(3, seed=8)

    def decoder(z):
        return torchdiffeq.odeint_adjoint(velocity, z, torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-10, atol=1e-10)[-1]

    z = _latents(2, 3)
    with pytest.raises((RuntimeError, NotImplementedError), match=r"autograd\.Function"):
        decoder_jacobian(decoder, z, mode="forward")
    reverse = decoder_jacobian(decoder, z, mode="loop")  # a square decoder: loop takes reverse mode
    torch.testing.assert_close(reverse, ode_decoder_jacobian(velocity, z, rtol=1e-10, atol=1e-10), rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"t0": 1.0, "t1": 1.0}, ValueError, "`t0` != `t1`"),
        ({"t1": float("nan")}, ValueError, "`t1` to be a finite float"),
        ({"method": "warp_drive"}, ValueError, "`method` to be a torchdiffeq solver, but got 'warp_drive'"),
        ({"method": 4}, TypeError, "`method` to be the name of a torchdiffeq solver"),
        ({"rtol": 0.0}, ValueError, "`rtol` to be a positive finite float"),
        ({"atol": -1.0}, ValueError, "`atol` to be a positive finite float"),
        ({"options": [("step_size", 0.1)]}, TypeError, "`options` to be a mapping"),
        ({"adjoint": 1}, TypeError, "`adjoint` to be a bool"),
        ({"adjoint": True}, TypeError, "`velocity` to be a torch.nn.Module"),
    ],
)
def test_bad_solver_settings_are_named_before_any_solve(options, error, match):
    with pytest.raises(error, match=match):
        ODEDecoder(lambda t, x: x, **options)


def test_bad_velocity_and_latents_are_named():
    with pytest.raises(TypeError, match="`velocity` to be a callable"):
        ODEDecoder("v")
    with pytest.raises(TypeError, match="`velocity` to be a callable"):
        ode_decoder_jacobian(None, _latents(2, 2))
    with pytest.raises(ValueError, match=r"`z` of shape \(N, d\)"):
        ode_decoder_jacobian(lambda t, x: x, torch.zeros(2, 2, 2, dtype=F64))
    with pytest.raises(ValueError, match="`chunk_size`"):
        ode_decoder_jacobian(lambda t, x: x, _latents(2, 2), chunk_size=0)


def test_repr_names_the_solver():
    decoder = ODEDecoder(nn.Identity(), method="rk4", options={"step_size": 0.25})
    assert "method='rk4'" in repr(decoder) and "step_size" in repr(decoder)


# ------------------------------------------------------------------------------- callback


class LinearFlowModule(LightningModule):
    """A module whose decoder is the flow map of dx/dt = A x (A fixed): the callback's values have closed forms."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.latent_dim = a.shape[0]
        self.register_buffer("a", a)
        self.decoder = ODEDecoder(self.velocity, rtol=1e-10, atol=1e-11)
        self.shift = nn.Parameter(torch.zeros(a.shape[0], dtype=F64))  # what training changes

    def velocity(self, t, x):
        return x @ self.a.T

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (x - self.shift).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings(ENGINE_FALLBACK)
@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")
@pytest.mark.filterwarnings("ignore:.*the Trainer has no logger:UserWarning")
def test_callback_on_an_ode_decoder_logs_the_closed_form(tmp_path):
    a = _matrix(3, seed=9)
    callback = ManifoldEntropicMetricsCallback(num_samples=32, num_evaluations=2, log_figures=False)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=4,
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    data = DataLoader(TensorDataset(torch.randn(16, 3, dtype=F64)), batch_size=4)
    trainer.fit(LinearFlowModule(a), data)
    truth = linear_closed_form(torch.linalg.matrix_exp(a))
    values = callback.last_metrics
    assert len(callback.history) == 3
    torch.testing.assert_close(values["entropy"].double(), truth["entropy"], rtol=0, atol=1e-7)
    torch.testing.assert_close(values["total_correlation"].double(), truth["total_correlation"], rtol=0, atol=1e-7)
    assert math.isfinite(float(values["entropy"]))


# ------------------------------------------------------------------------------- example


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_flow_matching_example_fits_and_its_latents_are_the_data_axes(tmp_path):
    results = _example("flow_matching").main(["--fast", "--out", str(tmp_path)])
    moons, torus, gaussian, truth = results["moons"], results["torus"], results["gaussian_prediction"], results["ground_truth"]
    d = len(truth["spectrum"])
    assert d == 6
    # two moons: the model's entropy is close to the data's negative log-likelihood under it (a fit)
    assert abs(moons["H"] - moons["NLL"]) < 0.2
    assert moons["H_core"] > moons["H_detail"]
    # torus: the model's entropy within 2 nats of the truth's (the fast model is small and short-trained) ...
    assert abs(torus["entropy_error"]) < 2.0
    # ... its spectrum is the Gaussian prediction of flow matching (flat, the data axes), not the ground truth's
    prediction_error = (torch.tensor(torus["spectrum"]) - torch.tensor(gaussian["spectrum"])).abs().mean()
    assert prediction_error < 0.15
    assert torus["spectrum_error_mean"] > 0.5
    # ... and its latents are entangled: large total correlation, near the Gaussian prediction's, few true latents matched
    assert torus["total_correlation"] > 2.0
    assert abs(torus["total_correlation"] - gaussian["total_correlation"]) < 1.5
    assert torus["num_true_latents_matched"] < d
    assert Path(results["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
