"""Curvature-vector products of one rank's loss w.r.t. the flat parameter vector.

Three products are offered (docs/algorithms.md §4 and §7), all on the flat vector θ of
:class:`~hpcopt.numerics.flat.FlatParameters`:

``hvp-double-backward`` (Pearlmutter's R-op by reverse-over-reverse)
    ``g(θ) = ∇f(θ)`` is built once with ``create_graph=True``; each product is
    ``Hv = ∂⟨g, v⟩/∂θ``, one backward through the stored graph of ``g``.
``hvp-forward-over-reverse``
    ``Hv = d/dε ∇f(θ + εv)`` by ``torch.func.jvp`` of ``torch.func.grad``.  Forward
    mode has no graph to keep, so every product re-runs the forward and backward;
    ``torch.func.linearize`` would keep one, but tracing it costs ~200 gradients
    (see ``benchmarks/hvp_cost.py``), more than a whole Krylov solve saves.
``ggn`` (Schraudolph's Gauss–Newton product)
    ``Gv = Jᵀ H_L J v`` with ``J = ∂z/∂θ`` the Jacobian of the problem's outputs
    ``z`` and ``H_L = ∂²L/∂z²`` the Hessian of the criterion in output space.  One
    forward is stored; ``Jv`` uses the double-vjp trick (``Jᵀu`` is built with
    ``create_graph`` and is linear in ``u``, so ``∂⟨Jᵀu, v⟩/∂u = Jv``), ``H_L`` is a
    double backward of the criterion alone, and ``Jᵀw`` is one ordinary backward
    through the stored forward.  Where the forward is a chain of standard layers
    (an MNIST MLP or CNN without batch norm), ``Jv`` is instead pushed through the
    chain from the stored activations (:mod:`~hpcopt.numerics.layer_jvp`), about one
    forward instead of two, and the operator's set-up skips the ``create_graph``.
    ``G`` is PSD whenever the criterion is convex in ``z`` (cross-entropy, MSE).

Forward passes, batch norm and dropout — what the operators guarantee:

* Stored-graph operators (``hvp-double-backward``, ``ggn``) run exactly one forward
  when built; every product reuses it, so all products see the same batch-norm
  batch statistics and the same dropout mask as the gradient of the same pass.
* ``hvp-forward-over-reverse`` re-runs the forward per product.  Each operator
  draws one seed and runs its gradient pass and every product under a forked RNG
  seeded with it, so dropout masks are identical across them.
* The module's batch-norm running statistics are updated at most once, and only
  by a pass that also yields the gradient (``value_and_grad`` and
  ``value_grad_and_curvature``).  ``value`` and ``curvature`` (e.g. on a curvature
  sub-batch) and every forward-mode product run on a private copy of the buffers,
  taken before the gradient pass, so in eval mode they use the same running
  statistics the gradient saw and in train mode they leave the module untouched.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import cast

import torch
from torch import Tensor

from hpcopt.errors import ConfigError
from hpcopt.numerics.flat import FlatParameters
from hpcopt.numerics.layer_jvp import could_be_chain, record_chain

Forward = Callable[[Callable[[Tensor], Tensor], Tensor], Tensor]
Criterion = Callable[[Tensor, Tensor], Tensor]
RngContext = Callable[[], AbstractContextManager[None]]


class CurvatureKind(enum.StrEnum):
    """Which curvature matrix ``B`` a :class:`CurvatureOperator` multiplies by."""

    HVP_REVERSE = "hvp-double-backward"
    HVP_FORWARD = "hvp-forward-over-reverse"
    GGN = "ggn"


# The Hessian product that ``parse_curvature("hessian")`` means.  Chosen by
# ``benchmarks/hvp_cost.py``: double backward amortises its one graph over a
# Krylov solve, while forward-over-reverse pays a forward + backward per product
# (about 2x slower per product on the MLP and CNN benchmarks, one thread).
DEFAULT_HESSIAN = CurvatureKind.HVP_REVERSE

_ALIASES: dict[str, CurvatureKind] = {
    "hessian": DEFAULT_HESSIAN,
    "ggn": CurvatureKind.GGN,
    "gauss-newton": CurvatureKind.GGN,
}


def parse_curvature(name: str | CurvatureKind) -> CurvatureKind:
    """The :class:`CurvatureKind` for a user-facing name.

    Accepts the enum values (``"hvp-double-backward"``, ``"hvp-forward-over-reverse"``,
    ``"ggn"``), the enum member names in any case (``"hvp_reverse"``) and the short
    names ``"hessian"`` (the fastest Hessian product, :data:`DEFAULT_HESSIAN`) and
    ``"gauss-newton"``.

    Raises:
        ConfigError: ``name`` is none of these; the message lists the choices.
    """
    if isinstance(name, CurvatureKind):
        return name
    key = str(name).strip().lower()
    if key in _ALIASES:
        return _ALIASES[key]
    for kind in CurvatureKind:
        if key in (kind.value, kind.name.lower(), kind.name.lower().replace("_", "-")):
            return kind
    choices = sorted({*_ALIASES, *(kind.value for kind in CurvatureKind)})
    raise ConfigError(f"unknown curvature {name!r}; choose one of: {', '.join(choices)}")


class CurvatureOperator:
    """``v ↦ (B + damping·I) v`` for a curvature matrix ``B`` linearised at one θ.

    Attributes:
        kind: which ``B``.
        numel: length of the flat vectors it accepts and returns.
        damping: the Tikhonov / Levenberg–Marquardt shift λ added to ``B``.
        products: how many products have been taken (for cost accounting).
    """

    def __init__(self, kind: CurvatureKind, numel: int, damping: float, dtype: torch.dtype) -> None:
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        self.kind = kind
        self.numel = numel
        self.damping = float(damping)
        self.products = 0
        self._dtype = dtype

    def __call__(self, v: Tensor) -> Tensor:
        """``(B + damping·I) v``, with the dtype and shape of ``v``."""
        if v.shape != (self.numel,):
            raise ValueError(f"expected a flat vector of shape ({self.numel},), got {tuple(v.shape)}")
        # Krylov solvers may run in float64 on a float32 model: the product is taken
        # in the model's dtype and handed back in the caller's.
        product = self._product(v.detach().to(self._dtype))
        self.products += 1
        product = product.to(v.dtype)
        if self.damping:
            product = product.add(v, alpha=self.damping)
        return product

    def quadratic_form(self, v: Tensor) -> float:
        """``vᵀ(B + damping·I)v``: the curvature along ``v`` (a line search needs no more)."""
        if v.shape != (self.numel,):
            raise ValueError(f"expected a flat vector of shape ({self.numel},), got {tuple(v.shape)}")
        value = self._quadratic_form(v.detach().to(self._dtype))
        self.products += 1
        return value + self.damping * float(torch.dot(v, v))

    def gram(self, vectors: Sequence[Tensor]) -> Tensor:
        """``[vᵢᵀ(B + damping·I)vⱼ]`` (float64, symmetric): a subspace's curvature, k products."""
        for v in vectors:
            if v.shape != (self.numel,):
                raise ValueError(f"expected flat vectors of shape ({self.numel},), got {tuple(v.shape)}")
        flat_vectors = [v.detach().to(self._dtype) for v in vectors]
        matrix = self._gram(flat_vectors).to(torch.float64)
        self.products += len(vectors)
        if self.damping:
            metric = torch.stack(flat_vectors).to(torch.float64)
            matrix = matrix + self.damping * (metric @ metric.T)
        return 0.5 * (matrix + matrix.T)

    def _product(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _quadratic_form(self, v: Tensor) -> float:
        return float(torch.dot(v, self._product(v)))

    def _gram(self, vectors: list[Tensor]) -> Tensor:
        products = torch.stack([self._product(v) for v in vectors]).to(torch.float64)
        return torch.stack(vectors).to(torch.float64) @ products.T


class _DoubleBackwardHVP(CurvatureOperator):
    """Pearlmutter's ``Hv`` as a backward through the stored graph of ``∇f``."""

    def __init__(self, theta: Tensor, grad: Tensor, damping: float) -> None:
        super().__init__(CurvatureKind.HVP_REVERSE, theta.numel(), damping, theta.dtype)
        self._theta = theta
        self._grad = grad

    def _product(self, v: Tensor) -> Tensor:
        if not self._grad.requires_grad:
            # The loss is affine in θ (e.g. a single linear layer with a linear
            # criterion): the gradient graph is constant and H = 0.
            return torch.zeros_like(v)
        (hv,) = torch.autograd.grad(self._grad, self._theta, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if hv is None else hv


class _ForwardOverReverseHVP(CurvatureOperator):
    """``Hv`` as the directional derivative of ``∇f`` by ``torch.func.jvp``."""

    def __init__(
        self,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        theta: Tensor,
        targets: Tensor,
        rng: RngContext,
        damping: float,
        linearize: bool = False,
    ) -> None:
        super().__init__(CurvatureKind.HVP_FORWARD, theta.numel(), damping, theta.dtype)
        self._theta = theta
        self._loss_fn = loss_fn
        self._rng = rng
        self._targets = targets
        # Floating targets ride along as a primal with a materialised zero tangent:
        # without one, the forward-mode formula of mse_loss_backward writes into an
        # immutable ZeroTensor and fails (torch 2.13).  Integer class labels cannot
        # carry a tangent and do not need one.
        self._target_tangent = torch.zeros_like(targets) if targets.is_floating_point() else None
        self._grad_fn = torch.func.grad(loss_fn)  # w.r.t. θ only (argnums=0)
        self._linearized: Callable[..., Tensor] | None = None
        if linearize:
            # Kept for the benchmark: one traced jvp graph instead of a forward per
            # product, at a tracing cost far above a Krylov solve's worth of products.
            with rng():
                if self._target_tangent is None:
                    _, self._linearized = torch.func.linearize(lambda t: self._grad_fn(t, targets), theta)
                else:
                    _, self._linearized = torch.func.linearize(self._grad_fn, theta, targets)

    def _product(self, v: Tensor) -> Tensor:
        if self._linearized is not None:
            if self._target_tangent is None:
                return self._linearized(v)
            return self._linearized(v, self._target_tangent)
        # torch.func.jvp is annotated as a 2- or 3-tuple whatever has_aux says.
        with self._rng():
            if self._target_tangent is None:
                targets = self._targets
                _, hv = cast(
                    "tuple[Tensor, Tensor]",
                    torch.func.jvp(lambda t: self._grad_fn(t, targets), (self._theta,), (v,)),
                )
            else:
                _, hv = cast(
                    "tuple[Tensor, Tensor]",
                    torch.func.jvp(self._grad_fn, (self._theta, self._targets), (v, self._target_tangent)),
                )
        return hv


JacobianVector = Callable[[Tensor], "Tensor | None"]


def _double_vjp(jt_u: Tensor, u: Tensor) -> JacobianVector:
    """``v ↦ J v`` by the double-vjp trick on ``Jᵀu`` built with ``create_graph``."""

    def jvp(v: Tensor) -> Tensor | None:
        # Jᵀu is linear in u, so its vjp with v w.r.t. u is Jv.
        if not jt_u.requires_grad:
            return None
        (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True, allow_unused=True)
        return jv

    return jvp


class _GaussNewton(CurvatureOperator):
    """Schraudolph's ``Jᵀ H_L J v`` on one stored forward."""

    def __init__(
        self,
        theta: Tensor,
        outputs: Tensor,
        outputs_leaf: Tensor,
        dloss_doutputs: Tensor,
        jvp: JacobianVector,
        damping: float,
    ) -> None:
        super().__init__(CurvatureKind.GGN, theta.numel(), damping, theta.dtype)
        self._theta = theta
        self._outputs = outputs
        self._outputs_leaf = outputs_leaf
        self._dloss = dloss_doutputs
        self._jvp = jvp

    def _output_space(self, v: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(J v, H_L J v)``, or None where the model or the criterion ignores the parameters."""
        jv = self._jvp(v)
        if jv is None or not self._dloss.requires_grad:
            return None
        # H_L (J v): double backward of the criterion alone, in output space (cheap).
        (hjv,) = torch.autograd.grad(self._dloss, self._outputs_leaf, jv, retain_graph=True, allow_unused=True)
        return None if hjv is None else (jv, hjv)

    def _quadratic_form(self, v: Tensor) -> float:
        # vᵀJᵀH_L J v = (Jv)ᵀ(H_L Jv): the backward through the model that a product ends with is not needed.
        pair = self._output_space(v)
        return 0.0 if pair is None else float(torch.sum(pair[0] * pair[1]))

    def _product(self, v: Tensor) -> Tensor:
        pair = self._output_space(v)
        if pair is None or not self._outputs.requires_grad:
            return torch.zeros_like(v)
        # Jᵀ (H_L J v): one ordinary backward through the stored forward.
        (gv,) = torch.autograd.grad(self._outputs, self._theta, pair[1], retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if gv is None else gv


class LocalObjective:
    """One rank's mean loss on its shard as a function of the flat parameter vector.

    ``forward(net, inputs)`` evaluates the problem with ``net`` standing for the
    model (it may differentiate w.r.t. the inputs, as a PINN does), and
    ``criterion(outputs, targets)`` reduces the outputs to the mean loss.  Both
    must compose with ``torch.func`` transforms and double backward.

    Values, gradients and curvature are all taken at the current ``flat.data``
    (or at a given ``theta`` for :meth:`value`).  No collective is called here:
    the caller allreduces the gradient and each product.

    Attributes:
        layer_chain: Gauss–Newton products take ``J v`` from the stored activations
            where the forward is a chain of standard layers
            (:mod:`~hpcopt.numerics.layer_jvp`); ``False`` keeps the generic
            double-vjp product (for comparisons; the two agree to rounding).
    """

    layer_chain: bool = True

    def __init__(
        self,
        flat: FlatParameters,
        forward: Forward,
        criterion: Criterion,
        inputs: Tensor,
        targets: Tensor,
    ) -> None:
        self.flat = flat
        self.forward = forward
        self.criterion = criterion
        self.inputs = inputs
        self.targets = targets

    # -- evaluation helpers -------------------------------------------------

    def _loss(self, theta: Tensor, buffers: dict[str, Tensor] | None) -> Tensor:
        return self.criterion(self.forward(self.flat.functional(theta, buffers), self.inputs), self.targets)

    def _forward_mode_loss(self, snapshot: dict[str, Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        """``(θ, targets) ↦ loss`` for torch.func transforms, never touching the module's buffers."""

        def loss_fn(theta: Tensor, targets: Tensor) -> Tensor:
            # Fresh buffer copies per call: torch.func forbids mutating a captured
            # tensor, and batch norm updates its running statistics in place.
            buffers = {name: buf.clone() for name, buf in snapshot.items()}
            return self.criterion(self.forward(self.flat.functional(theta, buffers), self.inputs), targets)

        return loss_fn

    def _seeded_rng(self) -> RngContext:
        """A context factory that replays one RNG stream, so every pass draws the same dropout mask."""
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        device = self.flat.device

        @contextmanager
        def fixed() -> Iterator[None]:
            cuda_devices = [device.index or torch.cuda.current_device()] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda_devices):
                torch.default_generator.manual_seed(seed)
                if device.type == "cuda":
                    torch.cuda.manual_seed(seed)
                yield

        return fixed

    # -- public API -----------------------------------------------------------

    def value(self, theta: Tensor | None = None) -> float:
        """The loss at ``theta`` (default: the current ``flat.data``), with no graph through θ.

        Grad mode stays on because a problem's forward may differentiate w.r.t. its
        inputs (PINN); θ is detached, so no parameter graph is built and, for an
        ordinary model, the cost is that of a ``no_grad`` forward.  Batch-norm
        running statistics are not updated.
        """
        theta = (self.flat.data if theta is None else theta).detach()
        with torch.enable_grad():
            loss = self._loss(theta, self.flat.buffer_snapshot())
        return float(loss.detach())

    def value_and_grad(self) -> tuple[float, Tensor]:
        """The loss and its gradient at ``flat.data``; the gradient is ``flat.grad`` itself.

        An ordinary forward/backward on the module, so the gradient accumulates in
        place into ``flat.grad`` (zeroed first) and batch-norm running statistics
        are updated once, as in plain training.
        """
        self.flat.zero_grad()
        loss = self.criterion(self.forward(self.flat.model, self.inputs), self.targets)
        loss.backward()
        return float(loss.detach()), self.flat.grad

    def value_then_grad(self) -> tuple[float, Callable[[], Tensor]]:
        """The loss at ``flat.data`` now, and a function that finishes its gradient later.

        The pass of :meth:`value_and_grad` with its backward deferred: calling the
        returned function (at most once, before ``flat.data`` changes) runs the
        backward into ``flat.grad`` and returns it, bit-identical to
        :meth:`value_and_grad`.  A trial point that is rejected never pays for it.
        """
        loss = self.criterion(self.forward(self.flat.model, self.inputs), self.targets)

        def finish() -> Tensor:
            self.flat.zero_grad()
            loss.backward()
            return self.flat.grad

        return float(loss.detach()), finish

    def curvature(self, kind: CurvatureKind | str, *, damping: float = 0.0) -> CurvatureOperator:
        """The operator ``v ↦ (B + damping·I) v`` linearised at the current ``flat.data``.

        Its forward (and, for the stored-graph kinds, its backward) run here, once,
        on a private copy of the buffers; ``flat.grad`` is left alone.  Use
        :meth:`value_grad_and_curvature` when the gradient is wanted from the same
        inputs.
        """
        _, _, operator = self._build(parse_curvature(kind), damping, want_grad=False)
        return operator

    def gram(self, kind: CurvatureKind | str, vectors: Sequence[Tensor]) -> Tensor:
        """``[vᵢᵀ B vⱼ]`` (k × k, float64) at the current ``flat.data``, B of ``kind``.

        For Gauss–Newton no operator is built: k forward-mode Jacobian-vector products
        ``J vᵢ`` and the criterion's Hessian in output space give ``(J vᵢ)ᵀ H_L (J vⱼ)``,
        which skips the backward with graph that a product operator needs (on a CPU
        that set-up costs more than the products).  Other kinds build their operator
        and take k products.  Buffers and dropout masks are as for :meth:`curvature`.
        """
        kind = parse_curvature(kind)
        if kind is not CurvatureKind.GGN:
            return self.curvature(kind).gram(vectors)
        theta = self.flat.data.detach()
        for v in vectors:
            if v.shape != theta.shape:
                raise ValueError(f"expected flat vectors of shape {tuple(theta.shape)}, got {tuple(v.shape)}")
        snapshot = self.flat.buffer_snapshot()
        rng = self._seeded_rng()

        def outputs_of(point: Tensor) -> Tensor:
            buffers = {name: buf.clone() for name, buf in snapshot.items()}
            return self.forward(self.flat.functional(point, buffers), self.inputs)

        k = len(vectors)
        jvs: list[Tensor] = []
        outputs: Tensor | None = None
        # Grad mode on: a problem's forward may differentiate w.r.t. its inputs (PINN).
        with torch.enable_grad():
            chain = None
            # The static test first: a forward recorded in vain would be one forward too many.
            if self.layer_chain and vectors and could_be_chain(self.flat.model):
                with rng():
                    outputs, chain = record_chain(self.flat, lambda: outputs_of(theta))
            for v in vectors:
                tangent = v.detach().to(theta.dtype)
                if chain is not None:
                    jvs.append(chain.jvp(tangent))
                    continue
                with rng():
                    outputs, jv = cast("tuple[Tensor, Tensor]", torch.func.jvp(outputs_of, (theta,), (tangent,)))
                jvs.append(jv.detach())
            if outputs is None:
                return torch.zeros(0, 0, dtype=torch.float64)
            outputs_leaf = outputs.detach().requires_grad_()
            loss = self.criterion(outputs_leaf, self.targets)
            (dloss,) = torch.autograd.grad(loss, outputs_leaf, create_graph=True)
            if not dloss.requires_grad:  # a criterion linear in the outputs: H_L = 0
                return torch.zeros(k, k, dtype=torch.float64)
            hjvs = []
            for jv in jvs:
                (hjv,) = torch.autograd.grad(dloss, outputs_leaf, jv, retain_graph=True, allow_unused=True)
                hjvs.append(torch.zeros_like(jv) if hjv is None else hjv)
        left = torch.stack([jv.reshape(-1) for jv in jvs]).to(torch.float64)
        right = torch.stack([hjv.reshape(-1) for hjv in hjvs]).to(torch.float64)
        matrix = left @ right.T
        return 0.5 * (matrix + matrix.T)

    def value_grad_and_curvature(
        self, kind: CurvatureKind | str, *, damping: float = 0.0
    ) -> tuple[float, Tensor, CurvatureOperator]:
        """Loss, gradient and curvature operator from one shared forward pass.

        The gradient is copied into ``flat.grad`` and ``flat.grad`` is returned.
        Batch-norm running statistics are updated once, by this pass.  This is the
        hot path of the Hessian-free and Steihaug optimizers.
        """
        loss, grad, operator = self._build(parse_curvature(kind), damping, want_grad=True)
        with torch.no_grad():
            self.flat.grad.copy_(grad)
        return loss, self.flat.grad, operator

    def _build(
        self, kind: CurvatureKind, damping: float, *, want_grad: bool
    ) -> tuple[float, Tensor, CurvatureOperator]:
        # A clone, not a view of flat.data: the operator must stay linearised at
        # this θ even after the optimizer moves flat.data (trial steps, line search),
        # and in-place writes to flat.data must not trip autograd's version checks.
        theta = self.flat.data.detach().clone().requires_grad_()
        snapshot = self.flat.buffer_snapshot()
        # Only a pass that also delivers the gradient may update running statistics.
        pass_buffers = None if want_grad else snapshot
        with torch.enable_grad():
            if kind is CurvatureKind.HVP_REVERSE:
                loss = self._loss(theta, pass_buffers)
                (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
                operator: CurvatureOperator = _DoubleBackwardHVP(theta, grad, damping)
                return float(loss.detach()), grad.detach(), operator
            if kind is CurvatureKind.HVP_FORWARD:
                rng = self._seeded_rng()
                loss_value, grad = float("nan"), torch.zeros_like(theta)
                if want_grad:
                    with rng():
                        loss = self._loss(theta, pass_buffers)
                        (grad,) = torch.autograd.grad(loss, theta)
                    loss_value = float(loss.detach())
                operator = _ForwardOverReverseHVP(
                    self._forward_mode_loss(snapshot), theta.detach(), self.targets, rng, damping
                )
                return loss_value, grad, operator
            if kind is CurvatureKind.GGN:
                return self._build_ggn(theta, pass_buffers, damping, want_grad=want_grad)
        raise AssertionError(f"unhandled curvature kind {kind}")

    def _build_ggn(
        self, theta: Tensor, buffers: dict[str, Tensor] | None, damping: float, *, want_grad: bool
    ) -> tuple[float, Tensor, CurvatureOperator]:
        def run() -> Tensor:
            return self.forward(self.flat.functional(theta, buffers), self.inputs)

        outputs, chain = record_chain(self.flat, run) if self.layer_chain else (run(), None)
        # The criterion is cut from the model at the outputs so that its Hessian
        # H_L can be applied by a double backward that never re-enters the model.
        outputs_leaf = outputs.detach().requires_grad_()
        loss = self.criterion(outputs_leaf, self.targets)
        (dloss,) = torch.autograd.grad(loss, outputs_leaf, create_graph=True)
        if chain is not None:
            # J v from the stored activations; the gradient, when wanted, is one
            # ordinary backward that keeps the forward for the products' Jᵀ.
            grad = torch.zeros_like(theta)
            if want_grad and outputs.requires_grad:
                (maybe,) = torch.autograd.grad(outputs, theta, dloss.detach(), retain_graph=True, allow_unused=True)
                grad = grad if maybe is None else maybe
            operator = _GaussNewton(theta, outputs, outputs_leaf, dloss, chain.jvp, damping)
            return float(loss.detach()), grad, operator
        # u = ∂L/∂z makes Jᵀu the gradient itself, and since Jᵀu is linear in u the
        # same graph yields Jv for any v: one backward serves both.
        u = dloss.detach().requires_grad_()
        (jt_u,) = torch.autograd.grad(outputs, theta, u, create_graph=True)
        operator = _GaussNewton(theta, outputs, outputs_leaf, dloss, _double_vjp(jt_u, u), damping)
        return float(loss.detach()), jt_u.detach(), operator
