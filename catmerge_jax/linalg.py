"""Top-c eigenvectors of symmetric (possibly indefinite) matrices, batched: full ``eigh`` or block Krylov.

CAT needs the eigenvectors of the c (2–4) largest ALGEBRAIC eigenvalues of ``G_k`` (out × out, indefinite).
A full ``eigh`` costs O(out³) — for out = 3072/4096 it dominates a merge. :func:`block_krylov_top` runs an
explicitly restarted block Lanczos (full reorthogonalisation, Rayleigh–Ritz on the Krylov basis), which
resolves BOTH ends of the spectrum, so no shift is needed for an indefinite matrix (plain subspace iteration
with a shift converges at rate (λ_{c+1}+σ)/(λ_c+σ) ≈ 1 and LOBPCG-style 3-block updates stall on clustered
spectra; a Krylov space of dimension m converges like Chebyshev polynomials of degree m/p).

Every solve reports a convergence flag from the Ritz residuals: with ``r_j = ‖G v_j − θ_j v_j‖`` and the
estimated gap ``δ = θ_c − θ_{c+1} − r_{c+1}``, the Davis–Kahan bound gives ``sin∠(span V, span B) ≲ max r_j / δ``.
A solve is accepted when that bound is ``≤ tol``, or when the residuals sit at the precision floor
``ε_f = floor · eps · ‖G‖`` — then a full ``eigh`` in the same dtype is no more accurate (its own vectors carry
residuals of that order, so its subspace error is also ``≈ ε_f / δ``). Either way the gap must be resolvable,
``δ > ε_f`` (and ``δ ≥ min_gap · ‖G‖`` if the user asks for more). Rejected solves — an eigengap too small to
resolve in this precision, or too small for the Krylov space to converge within ``restarts`` — fall back to
``eigh`` for that matrix only (``lax.cond`` inside ``lax.map``, so the fallback costs nothing when every matrix
converged).

Why not a fixed relative gap such as 1e-3: CAT's ``G_k`` has a large negative part (the ``−λ A_i`` terms), so
the top eigenvalues are often within 1e-4‖G‖ of each other although they are well apart on their own scale.
eigh decides such a subspace no better than the converged Krylov space (both are ``≈ eps·‖G‖/δ`` from exact),
and refusing them sent over half of a ViT-B/32 block's solves back to eigh.

>>> import jax.numpy as jnp
>>> from catmerge_jax.linalg import top_eigenvectors
>>> top_eigenvectors(jnp.diag(jnp.array([1.0, 3.0, 2.0])), 1)[:, 0].tolist()
[0.0, 1.0, 0.0]
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax import hostlapack

__all__ = ["top_eigenvectors", "eigh_top", "eigh_largest", "factored_largest", "host_call", "block_krylov_top",
           "KrylovResult", "KrylovConfig", "krylov_config", "map_batch", "eigh_flops", "krylov_flops", "choose_solver",
           "accelerator_paths", "accelerator_paths_enabled", "FORCE_ACCELERATOR_ENV"]


# ------------------------------------------------------------------------------------------------------------
# Which branch of each CPU/accelerator choice runs: the platform's, or (for tests on CPU) the accelerator's.
# ------------------------------------------------------------------------------------------------------------

FORCE_ACCELERATOR_ENV = "CATMERGE_FORCE_ACCELERATOR_PATH"
"""Environment variable read once, at import: ``1`` makes :func:`accelerator_paths` the process's default."""

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _flag_from_env(value: str | None) -> bool:
    """``CATMERGE_FORCE_ACCELERATOR_PATH``'s value as a bool (unset: False)."""
    text = (value or "").strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    from catmerge_jax.errors import HyperparameterError

    raise HyperparameterError(f"{FORCE_ACCELERATOR_ENV}={value!r}: expected 1 or 0 (true/false, yes/no, on/off)")


class _ClearingFlag:
    """For JAX releases without ``jax.make_user_context``: a process-wide value whose every change clears JAX's
    caches, so no program traced under one value is reused under the other (slower, equally correct)."""

    def __init__(self, value: bool):
        self.value = value

    @contextlib.contextmanager
    def __call__(self, value: bool) -> Iterator[None]:
        old, self.value = self.value, value
        if value != old:
            jax.clear_caches()
        try:
            yield
        finally:
            changed, self.value = self.value != old, old
            if changed:
                jax.clear_caches()


def _switch(default: bool):
    # A user context is part of every jit cache key and trace context: a program compiled with the CPU branches is
    # never reused where the accelerator branches were asked for (the choice is made in Python, at trace time).
    make = getattr(jax, "make_user_context", None)
    return make(default_value=default) if make is not None else _ClearingFlag(default)


_ACCELERATOR_PATHS = _switch(_flag_from_env(os.environ.get(FORCE_ACCELERATOR_ENV)))


def accelerator_paths_enabled() -> bool:
    """Whether :func:`accelerator_paths` is in force here (in this thread, or process-wide by the environment)."""
    return bool(_ACCELERATOR_PATHS.value)


@contextlib.contextmanager
def accelerator_paths(enabled: bool = True) -> Iterator[None]:
    """Run the GPU/TPU branches of the solvers on whatever backend this is: a switch for testing them on CPU.

    The library picks a branch by platform in three places: :func:`eigh_largest` (LAPACK's selected-eigenpair route
    on the host vs a traced full ``eigh``), :func:`factored_largest` (one host call vs JAX's QR and ``eigh``) and
    :func:`map_batch`'s ``"auto"`` mode (``lax.map`` vs ``vmap``). Inside this context every one takes the
    accelerator's branch, so CI runs on a CPU the code a GPU or TPU user runs (``enabled=False`` gives the platform's
    branches back, e.g. for a stretch of code where ``CATMERGE_FORCE_ACCELERATOR_PATH=1`` made the accelerator's the
    default). The setting is thread-local and part of JAX's jit cache key: functions jitted before are traced again,
    never reused with the other branches. Results agree with the CPU branches to rounding; it is slower on CPU and
    runs jaxlib's batched CPU LAPACK kernels, which the CPU branches avoid (see :func:`unbatched`). See
    docs/accelerators.md.

    >>> import jax.numpy as jnp
    >>> with accelerator_paths():
    ...     values, _, _ = eigh_largest(jnp.diag(jnp.array([1.0, -4.0, 2.0])), 1)
    ...     accelerator_paths_enabled()
    True
    >>> values.tolist(), accelerator_paths_enabled()
    ([2.0], False)
    """
    with _ACCELERATOR_PATHS(bool(enabled)):
        yield


def _by_platform(cpu: Callable, accelerator: Callable, *operands):
    """``lax.platform_dependent`` between a CPU and an accelerator implementation, or the accelerator's alone
    under :func:`accelerator_paths`."""
    if accelerator_paths_enabled():
        return accelerator(*operands)
    return jax.lax.platform_dependent(*operands, cpu=cpu, default=accelerator)


class KrylovConfig(NamedTuple):
    """Static settings of the block Krylov solver.

    block: block size p (> c; extra columns speed convergence of the c-th vector).
    steps: Krylov steps per restart (basis dimension ``block * (steps + 1)``).
    restarts: maximum number of restarts (each restarts from the current best Ritz vectors).
    tol: accepted bound on ``sin∠`` between the computed and exact top-c subspace.
    min_gap: an extra smallest accepted relative eigengap ``δ / ‖G‖`` (default 0: only the precision floor
      applies). A positive value, e.g. 1e-3, sends near-tied matrices to eigh so the result follows eigh's
      tie-breaking (matching the plain path to float rounding even inside near-ties), at eigh's cost.
    floor: residuals below ``floor · eps · ‖G‖`` are accepted whatever the gap bound says (eigh in the same
      dtype is not more accurate than that); gaps below it are unresolvable and always fall back.
    """

    block: int = 8
    steps: int = 24
    restarts: int = 6
    tol: float = 1e-4
    min_gap: float = 0.0
    floor: float = 32.0


def krylov_config(c: int, n: int, **overrides) -> KrylovConfig:
    """A default :class:`KrylovConfig` for ``c`` vectors of an ``n × n`` problem."""
    # 16 columns: fewer sequential steps of fatter products than 8–9 (measured 1.3–1.6× faster on CAT's G_k at
    # out = 768 and 3072, with the same convergence).
    block = max(2 * c, c + 6, 16)
    # A basis of at most ~200 columns (and never more than n) keeps the Rayleigh–Ritz step negligible.
    cfg = KrylovConfig(block=block, steps=max(1, min(max(8, 192 // block), n // block - 1)))
    return cfg._replace(**overrides)


def eigh_flops(n: int) -> float:
    """Rough flop count of a full symmetric eigendecomposition with vectors (tridiagonalisation + QR/D&C)."""
    return 9.0 * n ** 3


def krylov_flops(n: int, cfg: KrylovConfig, matvec_flops_per_column: float | None = None,
                 expected_restarts: int = 2) -> float:
    """Rough flops of :func:`block_krylov_top` (``matvec_flops_per_column`` defaults to a dense ``2 n²``)."""
    per_col = 2.0 * n * n if matvec_flops_per_column is None else matvec_flops_per_column
    m = cfg.block * (cfg.steps + 1)
    per_restart = m * per_col + 6.0 * n * m * m + 9.0 * m ** 3
    return expected_restarts * per_restart


# Below this size a LAPACK eigh is a few milliseconds and the Krylov loop's many small ops cost more than
# their flop count suggests (per-op overhead); measured on CPU, where 768 is about break-even.
MIN_ITERATIVE_N = 640


def choose_solver(n: int, c: int, matvec_flops_per_column: float | None = None) -> str:
    """``"eigh"`` or ``"iterative"``, whichever is cheaper for an ``n × n`` problem (eigh when Krylov cannot help)."""
    cfg = krylov_config(c, n)
    if c == 0 or n < MIN_ITERATIVE_N or cfg.block * (cfg.steps + 1) >= n // 2:
        return "eigh"
    return "iterative" if krylov_flops(n, cfg, matvec_flops_per_column) < eigh_flops(n) else "eigh"


def unbatched(fn: Callable, x: jax.Array, core_dims: int = 2):
    """``fn`` over every leading batch index of ``x`` (its last ``core_dims`` axes are one problem).

    On CPU each problem is its own LAPACK call in a ``lax.map`` loop: jaxlib's batched LAPACK kernels (eigh, QR)
    split a batch over XLA:CPU's thread pool and wait for the pieces inside a pool thread, and on a 2-core machine
    two such calls in flight deadlock it (gdb: both pool threads in ``ParallelBatchMap`` → ``BlockingCounter::Wait``).
    The loop is as fast on CPU (measured: 72 eighs of 291 × 291, 0.60 s in a loop vs 0.57 s batched; 72 QRs of
    384 × 291, 0.63 s vs 0.61 s). Accelerators get the batched call (and so does the CPU under
    :func:`accelerator_paths`)."""
    lead = x.shape[:x.ndim - core_dims]
    if not lead:
        return fn(x)
    out = map_batch(fn, x.reshape((-1,) + x.shape[x.ndim - core_dims:]))
    return jax.tree.map(lambda y: y.reshape(lead + y.shape[1:]), out)


def eigh(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``jnp.linalg.eigh`` (symmetrized input) of ``(..., n, n)``, one LAPACK call per matrix on CPU
    (see :func:`unbatched`)."""
    return unbatched(lambda m: jnp.linalg.eigh(m, symmetrize_input=True), matrix)


def eigh_top(matrix: jax.Array, c: int) -> jax.Array:
    """Top-c eigenvectors, exact (:func:`eigh_largest`): ``(..., n, n) -> (..., n, c)``, decreasing eigenvalue."""
    if c == 0:
        return jnp.zeros(matrix.shape[:-1] + (0,), matrix.dtype)
    return eigh_largest(matrix, c)[1]


def _full_largest(matrix: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`eigh_largest` from a full ``eigh`` (accelerators, and the derivative everywhere)."""
    values, vectors = eigh(matrix)  # ascending
    scale = jnp.maximum(jnp.abs(values[..., -1]), jnp.abs(values[..., 0]))
    return values[..., ::-1][..., :k], vectors[..., ::-1][..., :k], scale


def host_call(fn: Callable, shapes: tuple[jax.ShapeDtypeStruct, ...], *args: jax.Array) -> tuple[jax.Array, ...]:
    """``jax.pure_callback(fn, shapes, *args, vmap_method="broadcast_all")`` whose 64-bit operands and results
    travel as ``uint32`` pairs.

    JAX converts a callback's operands and results by the ``jax_enable_x64`` setting of the thread the callback
    runs on, and XLA:CPU may run it on one of its worker threads, where a caller's ``with jax.enable_x64(True)``
    (a thread-local setting) does not hold: float64 operands then arrive as float32 and the float64 results are
    refused. Bit patterns in ``uint32`` are never converted. ``fn`` takes and returns NumPy arrays of the true
    dtypes and handles any leading batch axes (``vmap`` broadcasts all operands).
    """
    wide = [jnp.dtype(a.dtype).itemsize == 8 for a in args]
    wide_out = [jnp.dtype(s.dtype).itemsize == 8 for s in shapes]
    if not (any(wide) or any(wide_out)):
        return jax.pure_callback(fn, shapes, *args, vmap_method="broadcast_all")
    in_dtypes = [np.dtype(a.dtype) for a in args]

    def unpack(x, dtype, is_wide):
        x = np.asarray(x)
        return np.ascontiguousarray(x).view(dtype).reshape(x.shape[:-1]) if is_wide else x

    def on_host(*packed):
        results = fn(*(unpack(x, d, w) for x, d, w in zip(packed, in_dtypes, wide)))
        return tuple(np.ascontiguousarray(np.asarray(r, s.dtype)).view(np.uint32).reshape(np.shape(r) + (2,))
                     if w else np.asarray(r, s.dtype) for r, s, w in zip(results, shapes, wide_out))

    packed_args = [jax.lax.bitcast_convert_type(a, jnp.uint32) if w else a for a, w in zip(args, wide)]
    packed_shapes = tuple(jax.ShapeDtypeStruct(s.shape + (2,), jnp.uint32) if w else s
                          for s, w in zip(shapes, wide_out))
    out = jax.pure_callback(on_host, packed_shapes, *packed_args, vmap_method="broadcast_all")
    return tuple(jax.lax.bitcast_convert_type(r, s.dtype) if w else r for r, s, w in zip(out, shapes, wide_out))


def _host_solve(solve: Callable, k: int, n: int, core_ndims: tuple[int, ...], *args: jax.Array):
    """``(values (*lead, k), vectors (*lead, n, k), scale (*lead))`` of ``solve`` (a :mod:`catmerge_jax.hostlapack`
    per-problem solver) over every problem of ``args``, each ``(*lead, *core)`` with ``core_ndims`` problem axes:
    one host call for the batch, whose problems the host spreads over the cores."""
    lead = args[0].shape[:args[0].ndim - core_ndims[0]]
    dtype = args[0].dtype
    shapes = (jax.ShapeDtypeStruct(lead + (k,), dtype), jax.ShapeDtypeStruct(lead + (n, k), dtype),
              jax.ShapeDtypeStruct(lead, dtype))

    def on_host(*arrays):
        arrays = [np.asarray(a) for a in arrays]
        # vmap may have added batch axes: the host's leading axes are read off what arrived
        host_lead = arrays[0].shape[:arrays[0].ndim - core_ndims[0]]
        flat = [a.reshape((-1,) + a.shape[a.ndim - nd:]) for a, nd in zip(arrays, core_ndims)]
        return hostlapack.each_problem(solve, k, n, host_lead, arrays[0].dtype, *flat)

    return host_call(on_host, shapes, *args)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _largest(matrix: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    def on_cpu(m):
        return _host_solve(hostlapack.symmetric_largest, k, m.shape[-1], (2,), m)

    return _by_platform(on_cpu, lambda m: _full_largest(m, k), matrix)


@_largest.defjvp
def _largest_jvp(k, primals, tangents):
    # the derivative of a full eigh (its primal is the same eigenpairs to rounding)
    return jax.jvp(lambda m: _full_largest(m, k), primals, tangents)


def eigh_largest(matrix: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The ``k`` largest (algebraic) eigenpairs of symmetric ``(..., n, n)``, exact, and ``‖G‖₂``.

    On CPU, LAPACK's selected-eigenpair route on the host (:func:`catmerge_jax.hostlapack.lower_largest`: one
    tridiagonalisation, then only k vectors; measured 3× faster than a full ``eigh`` at n = 384 and 1536; the
    matrices of a batch spread over the cores); on GPU/TPU, and under :func:`accelerator_paths`, a full ``eigh``
    (``lax.platform_dependent`` picks by the platform the computation is compiled for). Works under ``jit`` and
    ``vmap``; its derivative is that of a full ``eigh``.

    Returns:
      ``(values (..., k) decreasing, vectors (..., n, k), scale (...) = max |eigenvalue|)``; input symmetrized.

    >>> import jax.numpy as jnp
    >>> values, vectors, scale = eigh_largest(jnp.diag(jnp.array([1.0, -4.0, 2.0])), 1)
    >>> values.tolist(), vectors[:, 0].tolist(), float(scale)
    ([2.0], [0.0, 0.0, 1.0], 4.0)
    """
    n = matrix.shape[-1]
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    return _largest(matrix, k)


# ------------------------------------------------------------------------------------------------------------
# The top eigenpairs of a factored matrix Zᵀ diag(w) Z (through a QR when it has fewer rows than columns).
# ------------------------------------------------------------------------------------------------------------


def _factored_jax(z: jax.Array, weights: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`factored_largest` with JAX's QR (accelerators): Q applied by its reflectors, never formed; with
    ``m ≥ n`` rows, ``G`` itself and a full ``eigh``."""
    m, n = z.shape[-2:]

    def one(args):
        zi, wi = args
        if m >= n:
            return _full_largest(zi.T @ (wi[:, None] * zi), k)
        h, taus = jnp.linalg.qr(zi.T, mode="raw")  # Zᵀ = Q R; h is the (m, n) transpose of LAPACK's packed form
        r = jnp.triu(h[:, :m].T)  # (m, m)
        values, small, scale = _full_largest((r * wi[None, :]) @ r.T, k)
        vectors = jax.lax.linalg.ormqr(h.T, taus, jnp.pad(small, ((0, n - m), (0, 0))))
        return values, vectors, scale

    lead = z.shape[:-2]
    flat = (z.reshape((-1, m, n)), weights.reshape((-1, m)))
    values, vectors, scale = map_batch(one, flat)
    return values.reshape(lead + (k,)), vectors.reshape(lead + (n, k)), scale.reshape(lead)


def factored_largest(z: jax.Array, weights: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The ``k`` largest eigenpairs of ``G = Zᵀ diag(w) Z`` inside ``range(Zᵀ)``, for ``z (..., m, n)`` and real
    ``weights (..., m)`` of any sign.

    With fewer rows than columns (``m < n``), ``G`` is never formed. With the QR factorization ``Zᵀ = Q R`` (Q
    ``n × m``), ``G = Q (R diag(w) Rᵀ) Qᵀ``: the eigenpairs of the ``m × m`` core, with Q applied to its vectors.
    Eigenvalues of ``G`` outside ``range(Zᵀ)`` are 0 (add rows of weight 0 to represent that subspace). On CPU one
    host call runs LAPACK's blocked Householder QR (``geqrf``), the core's selected eigenpairs (as
    :func:`eigh_largest`) and the reflectors applied to those k vectors only (``ormqr``): forming Q would cost as
    much again as the factorization. With ``m ≥ n`` there is nothing to gain from a QR and ``G`` itself is solved;
    on CPU it is built inside the same host call by one symmetric rank-update per sign of ``w`` (BLAS ``syrk``, half
    the flops of a product; rows of weight 0 are skipped), into the one triangle LAPACK reads. Accelerators run the
    same steps with JAX's QR (or ``G``) and a full ``eigh`` (as does the CPU under :func:`accelerator_paths`). The
    result carries no derivative (use it on constants, or under ``jax.lax.stop_gradient``).

    Returns:
      ``(values (..., k) decreasing, vectors (..., n, k) orthonormal, scale (...) = ‖G‖₂, the largest
      |eigenvalue|)``.

    >>> import jax.numpy as jnp
    >>> z = jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    >>> values, vectors, scale = factored_largest(z, jnp.array([1.0, -1.0]), 1)
    >>> values.tolist(), jnp.abs(vectors[:, 0]).tolist(), float(scale)
    ([1.0], [1.0, 0.0, 0.0], 4.0)
    """
    m, n = z.shape[-2:]
    if not 0 < k <= min(m, n):
        raise ValueError(f"k must be in [1, {min(m, n)}] for z of shape {z.shape}, got {k}")
    if weights.shape != z.shape[:-1]:
        raise ValueError(f"weights must have shape {z.shape[:-1]}, got {weights.shape}")
    z, weights = jax.lax.stop_gradient((z, weights.astype(z.dtype)))

    def on_cpu(z, weights):
        return _host_solve(hostlapack.factored_one, k, n, (2, 1), z, weights)

    return _by_platform(on_cpu, lambda a, b: _factored_jax(a, b, k), z, weights)


class KrylovResult(NamedTuple):
    """Output of :func:`block_krylov_top` for one matrix (batched under vmap)."""

    vectors: jax.Array  # (n, c) orthonormal Ritz vectors, decreasing Ritz value
    values: jax.Array  # (c,) Ritz values
    residual: jax.Array  # () max_j≤c ‖G v_j − θ_j v_j‖
    gap: jax.Array  # () estimated eigengap θ_c − θ_{c+1} − r_{c+1}
    scale: jax.Array  # () ‖G‖ estimate (largest |Ritz value|)
    converged: jax.Array  # () bool: residual ≤ max(tol·gap, floor), gap > floor and gap ≥ min_gap·scale
    restarts: jax.Array  # () int, restarts used


def _whiten_columns(w: jax.Array) -> jax.Array:
    """Orthonormal columns spanning ``w`` (n, p) via the eigendecomposition of ``wᵀw``; negligible directions
    become zero columns (inert in a basis). Only matmuls and a p × p eigh, which XLA runs far faster inside
    a loop than a Householder QR."""
    mu, e = jnp.linalg.eigh(w.T @ w)
    keep = mu > w.shape[0] * jnp.finfo(w.dtype).eps * jnp.max(mu)
    return w @ (e * jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, mu, 1.0)), 0.0))


def _orthonormalize_against(w: jax.Array, basis: jax.Array, basis_t: jax.Array | None = None) -> jax.Array:
    """``w`` (n, p) made orthonormal and orthogonal to the columns of ``basis`` (n, m; zero columns are inert).

    Two Gram–Schmidt passes, each followed by whitening ("twice is enough"), keep the basis orthonormal to
    float precision even when ``w`` lies nearly inside ``span(basis)``. ``basis_t``: a row-major copy of
    ``basisᵀ`` (m, n), so that both products are plain GEMMs (XLA:CPU reads a transposed operand several times
    slower).
    """
    basis_t = basis.T if basis_t is None else basis_t
    for _ in range(2):
        w = w - basis @ (basis_t @ w)
        w = _whiten_columns(w)
    return w


def _krylov_pass(matvec: Callable[[jax.Array], jax.Array], start: jax.Array, c: int, steps: int):
    """One block Lanczos pass from ``start`` (n, p): Ritz pairs of the Krylov space of dimension p·(steps+1)."""
    n, p = start.shape
    m = p * (steps + 1)
    dtype = start.dtype
    q0 = _whiten_columns(start)
    # The basis is kept twice, (n, m) and transposed (m, n), and the images transposed (m, n): every product of
    # the loop and of the Rayleigh–Ritz step is then a plain row-major GEMM (measured ≈ 3× faster on CPU than
    # reading the (n, m) basis transposed).
    basis = jnp.zeros((n, m), dtype).at[:, :p].set(q0)
    basis_t = jnp.zeros((m, n), dtype).at[:p].set(q0.T)
    images_t = jnp.zeros((m, n), dtype)  # images_t[j] = (G basis[:, j])ᵀ

    def body(j, carry):
        basis, basis_t, images_t = carry
        block = jax.lax.dynamic_slice_in_dim(basis, j * p, p, axis=1)
        image = matvec(block)
        images_t = jax.lax.dynamic_update_slice_in_dim(images_t, image.T, j * p, axis=0)
        nxt = _orthonormalize_against(image, basis, basis_t)
        basis = jax.lax.dynamic_update_slice_in_dim(basis, nxt, (j + 1) * p, axis=1)
        basis_t = jax.lax.dynamic_update_slice_in_dim(basis_t, nxt.T, (j + 1) * p, axis=0)
        return basis, basis_t, images_t

    basis, basis_t, images_t = jax.lax.fori_loop(0, steps, body, (basis, basis_t, images_t))
    last = jax.lax.dynamic_slice_in_dim(basis, steps * p, p, axis=1)
    images_t = jax.lax.dynamic_update_slice_in_dim(images_t, matvec(last).T, steps * p, axis=0)

    # Rayleigh–Ritz, robust to a (numerically) rank-deficient basis (an exhausted Krylov space): whiten by the
    # basis Gram and send discarded directions to -inf so they are never chosen as top Ritz pairs.
    gram = basis_t @ basis
    mu, e = jnp.linalg.eigh(gram)
    keep = mu > m * jnp.finfo(dtype).eps * jnp.max(mu)
    whiten = e * jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, mu, 1.0)), 0.0)
    h = whiten.T @ (basis_t @ images_t.T) @ whiten
    h = 0.5 * (h + h.T)
    big = 4.0 * (jnp.max(jnp.abs(h)) + 1.0)
    h = h - jnp.diag(jnp.where(keep, 0.0, big))
    theta, s = jnp.linalg.eigh(h)
    theta, s = theta[::-1], s[:, ::-1]
    coeff = whiten @ s[:, : p]
    ritz = basis @ coeff  # (n, p)
    image = (coeff.T @ images_t).T
    res = jnp.linalg.norm(image - ritz * theta[None, :p], axis=0)  # (p,)
    rank = jnp.sum(keep)
    # Krylov Ritz values converge at both ends: the extreme valid ones estimate ‖G‖.
    scale = jnp.maximum(jnp.abs(theta[0]), jnp.abs(theta[jnp.maximum(rank - 1, 0)]))
    return ritz, theta[:p], res, scale, rank


def _block_krylov_impl(matvec, n, c, config, key, like):
    p = config.block
    dtype = jax.tree.leaves(like)[0].dtype
    start = jax.random.normal(key, (n, p), dtype)

    def run(start):
        ritz, theta, res, scale, rank = _krylov_pass(matvec, start, c, config.steps)
        gap = theta[c - 1] - theta[c] - res[c]
        residual = jnp.max(res[:c])
        # A residual at the working-precision floor is as good as eigh's own in this dtype: accept it too.
        floor = config.floor * jnp.finfo(dtype).eps * scale
        resolvable = (gap > floor) & (gap >= config.min_gap * scale)
        ok = (residual <= jnp.maximum(config.tol * gap, floor)) & resolvable & (rank > c)
        # At the precision floor more restarts cannot help: a too-small gap stays too small.
        stalled = residual <= floor
        return ritz, theta, residual, gap, scale, ok, stalled

    def cond(state):
        *_, ok, stalled, it = state
        return (~ok) & (~stalled) & (it < config.restarts)

    def body(state):
        ritz, *_, it = state
        return (*run(ritz), it + 1)

    state = (*run(start), jnp.asarray(0))
    state = jax.lax.while_loop(cond, body, state)
    ritz, theta, residual, gap, scale, ok, _, it = state
    return KrylovResult(ritz[:, :c], theta[:c], residual, gap, scale, ok, it)


def block_krylov_top(matrix_or_matvec, c: int, *, n: int | None = None, config: KrylovConfig | None = None,
                     key: jax.Array | None = None) -> KrylovResult:
    """Top-c eigenpairs of ONE symmetric operator by restarted block Lanczos (vmap it for batches).

    Args:
      matrix_or_matvec: an ``(n, n)`` symmetric array, or a function ``V (n, p) -> G V (n, p)`` (matrix-free;
        then ``n`` is required).
      c: number of eigenpairs (static), ``1 <= c``; ``block * (steps + 1)`` should be well below n.
      config: :class:`KrylovConfig` (default :func:`krylov_config`).
      key: PRNG key of the random start block (default: a fixed key, so results are deterministic).
    Returns:
      :class:`KrylovResult`; check ``converged`` before trusting ``vectors``.
    """
    if callable(matrix_or_matvec):
        if n is None:
            raise ValueError("block_krylov_top: a matvec function needs n=")
        matvec = matrix_or_matvec
        like = jnp.zeros((), jnp.float32)
    else:
        matrix = matrix_or_matvec
        n = matrix.shape[-1]
        matvec = lambda v: matrix @ v  # noqa: E731
        like = matrix
    config = krylov_config(c, n) if config is None else config
    key = jax.random.key(0) if key is None else key
    return _block_krylov_impl(matvec, n, c, config, key, like)


def map_batch(fn: Callable, xs, *, mode: str = "auto"):
    """``fn`` over the leading axis of ``xs``: ``jax.vmap`` on accelerators (and under :func:`accelerator_paths`),
    ``lax.map`` on CPU.

    XLA:CPU runs batched small dots/eighs inside loops far slower than the same ops unbatched in a
    sequential loop (measured ~10× for 16 Krylov solves of 512 × 512); GPUs/TPUs want the batch.
    """
    if mode == "auto":
        mode = "map" if jax.default_backend() == "cpu" and not accelerator_paths_enabled() else "vmap"
    if mode == "vmap":
        return jax.vmap(fn)(xs)
    if mode == "map":
        return jax.lax.map(fn, xs)
    raise ValueError(f"mode must be 'auto', 'vmap' or 'map', got {mode!r}")


def _with_fallback(result: KrylovResult, fallback: Callable[[int], jax.Array], batch: int) -> jax.Array:
    """``result.vectors`` (B, n, c) with every non-converged entry b replaced by ``fallback(b)``.

    ``lax.map`` keeps the predicate unbatched, so ``lax.cond`` really skips the eigh of converged entries.
    """

    def pick(b):
        return jax.lax.cond(result.converged[b], lambda: result.vectors[b], lambda: fallback(b))

    return jax.lax.map(pick, jnp.arange(batch))


def top_eigenvectors(matrix: jax.Array, c: int, method: str = "eigh", *,
                     config: KrylovConfig | None = None) -> jax.Array:
    """Orthonormal eigenvectors of the ``c`` largest (algebraic) eigenvalues of symmetric ``matrix``.

    Args:
      matrix: ``(..., n, n)`` symmetric (indefinite is fine).
      c: static number of vectors, ``0 <= c <= n``.
      method: ``"eigh"`` (full decomposition; the default, so the plain path in :mod:`catmerge_jax.cat` stays
        the exact reference), ``"iterative"`` (block Krylov with eigh fallback for
        non-converged / small-gap matrices) or ``"auto"`` (whichever :func:`choose_solver` estimates cheaper).
      config: Krylov settings (default :func:`krylov_config`).
    Returns:
      ``(..., n, c)``, columns ordered by decreasing eigenvalue. The iterative result spans the same subspace
      as eigh's up to ``config.tol`` (columns may differ by sign).
    """
    if method not in ("auto", "eigh", "iterative"):
        raise ValueError(f"method must be 'auto', 'eigh' or 'iterative', got {method!r}")
    n = matrix.shape[-1]
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, {n}], got {c}")
    if method == "auto":
        method = choose_solver(n, c)
    if c == 0 or method == "eigh":
        return eigh_top(matrix, c)
    config = krylov_config(c, n) if config is None else config
    batch_shape = matrix.shape[:-2]
    flat = matrix.reshape((-1, n, n))
    result = map_batch(lambda a: block_krylov_top(a, c, config=config), flat)
    vectors = _with_fallback(result, lambda b: eigh_top(flat[b], c), flat.shape[0])
    return vectors.reshape(batch_shape + (n, c))
