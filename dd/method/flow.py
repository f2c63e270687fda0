"""AR flow matching for one token (paper Sec. 3.2 and App. C).

The teacher gives, for the next token, probabilities p over a codebook c_1..c_V in R^C. Seen in the
embedding space this is the Dirac mixture  sum_j p_j delta(c_j).  Rectified flow joins N(0, I) (t = 0)
to that mixture (t = 1) along x_t = (1 - t) x0 + t x1; solving its ODE from a noise token x0 gives a
deterministic token whose distribution is exactly p. ``flow_map`` is that map, discretised with
multistep DPM-Solver++ and snapped to the nearest codebook entry that p allows.

Everything the solver needs is closed form. Given x_t the posterior over which code x1 is,

    log w_j(x_t) = log p_j - |x_t - t c_j|^2 / (2 (1-t)^2) + const
                 = log p_j + (t x_t.c_j - t^2 |c_j|^2 / 2) / (1-t)^2 + const',

is a softmax over V logits (computed in log space: near t = 1 it is extremely sharp), and the data
prediction is D(x_t, t) = E[x1 | x_t] = sum_j w_j c_j. Only [N, V] matrices are ever formed.

In DPM-Solver notation alpha_t = t, sigma_t = 1 - t, lambda_t = log(t / (1 - t)); the solver moves
lambda upwards (noise -> data). Writing u = x / alpha, the ODE is du/dlambda = D - u, whose exact
solution over a step of length h is the "exponential integrator" form the updates below use.

Cost: nfe - 1 evaluations of an [N, V] softmax (the one at t = 0 is the prior mean, no softmax),
each one add, one in-place addmm (into one buffer reused across steps), one softmax and one skinny
matmul, and one addmv for the state update (``_fused_solve``), plus one masked nearest-code search.
Throughput figures: ``python -m dd bench`` (docs/benchmarks.md).
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager

import torch
from torch.utils.weak import WeakIdKeyDictionary

# Time grid. The default "adaptive" grid was chosen by measurement; see ``solver_times``.
SCHEDULES = ("adaptive", "logsnr", "time")
DEFAULT_SCHEDULE = "adaptive"
# adaptive window in lambda: [-log(spread) - WINDOW_BEFORE, -log(resolution) + WINDOW_AFTER]
WINDOW_BEFORE = 1.0
WINDOW_AFTER = 1.75
FIXED_LAMBDA = (-4.6, 4.6)     # the "logsnr" grid: t from 0.01 to 0.99
SCALE_PROBES = 256             # codebook rows used to estimate the nearest-neighbour distance

# Working-set bound: a chunk of rows holds a few [rows, V] matrices of at most this many elements.
# CPU: 1 M (4 MB, measured fastest: cache-resident; 4x larger or smaller is 15-40% slower).
# CUDA: 8 M (32 MB), so a whole AR step of a batch is a handful of chunks (fewer kernel launches).
CHUNK_ELEMENTS = 1 << 20
CHUNK_ELEMENTS_CUDA = 1 << 23


def codebook_scale(codebook: torch.Tensor) -> tuple[float, float]:
    """(spread, resolution) of a [V, C] codebook, the two lengths that place the flow's action.

    spread = rms distance of the rows from their mean: the posterior over codes starts to move once
    the noise-to-signal ratio e^-lambda falls to about this. resolution = median distance from a row
    to its nearest other row (estimated on at most SCALE_PROBES evenly spaced rows): the posterior
    has picked its code once e^-lambda is well below it.
    """
    return _cached_per_tensor(_SCALE_CACHE, codebook, None, lambda: _codebook_scale(codebook.detach().double()))


# per codebook tensor (by identity, invalidated by in-place changes): saves ~25 ms a call on CPU
# at V = 16384, which matters when a teacher step maps only a few dozen tokens
_SCALE_CACHE = WeakIdKeyDictionary()


def _cached_per_tensor(cache: WeakIdKeyDictionary, tensor: torch.Tensor, key, make):
    """``make()``, cached in ``cache`` per tensor (by identity) and ``key``, recomputed once the tensor
    changes in place; not cached for inference-mode tensors, which keep no version counter."""
    try:
        version = tensor._version
    except RuntimeError:
        return make()
    hit = cache.get(tensor)
    if hit is not None and hit[0] == (version, key):
        return hit[1]
    value = make()
    cache[tensor] = ((version, key), value)
    return value


def _codebook_scale(book: torch.Tensor) -> tuple[float, float]:
    V = book.shape[0]
    spread = (book - book.mean(0)).pow(2).sum(-1).mean().sqrt().item()
    if V < 2 or spread == 0.0:
        return 1.0, 1.0                      # one distinct code: every grid gives the same answer
    probe_rows = torch.linspace(0, V - 1, min(V, SCALE_PROBES), device=book.device).round().long()
    d = torch.cdist(book[probe_rows], book)
    d[torch.arange(len(probe_rows), device=book.device), probe_rows] = math.inf
    resolution = d.min(-1).values.median().item()
    # duplicated rows would give 0; never let the window end beyond 1e4 x finer than the spread
    return spread, max(resolution, 1e-4 * spread)


def time_grid(nfe: int, lam_lo: float, lam_hi: float, schedule: str = "logsnr") -> list[float]:
    """[0, t_1, ..., t_{nfe-1}, 1]: nfe evaluation times, then the end (t = 1).

    The first evaluation is at t = 0 exactly (the data prediction there is the prior mean, and the
    first step from the noise is exact to first order); the others run from lambda = lam_lo to
    lam_hi, uniformly in lambda ("logsnr") or uniformly in t ("time").
    """
    if schedule not in ("logsnr", "time"):
        raise ValueError(f"time_grid schedule must be 'logsnr' or 'time', got {schedule!r}")
    if not lam_lo < lam_hi:
        raise ValueError(f"need lam_lo < lam_hi, got {lam_lo}, {lam_hi}")
    n = nfe - 1
    if n == 0:
        return [0.0, 1.0]
    frac = [i / (n - 1) if n > 1 else 1.0 for i in range(n)]
    if schedule == "logsnr":
        ts = [_sigmoid(lam_lo + (lam_hi - lam_lo) * f) for f in frac]
    else:
        a, b = _sigmoid(lam_lo), _sigmoid(lam_hi)
        ts = [a + (b - a) * f for f in frac]
    return [0.0] + ts + [1.0]


def solver_times(nfe: int, codebook: torch.Tensor, schedule: str = DEFAULT_SCHEDULE) -> list[float]:
    """The solver's time grid for this codebook.

    "adaptive" (default): uniform in lambda over [-log(spread) - 1, -log(resolution) + 1.75]
    (``codebook_scale``), so that the grid covers where the posterior actually changes whatever the
    codebook's scale, dimension and size. "logsnr": uniform in lambda over t in [0.01, 0.99];
    "time": uniform in t over the same range. All start at t = 0.

    Measured on CPU, float32, 10 NFE, order 3 (the tests print the same kind of figures):

    % of noises mapped to another code than a float64 reference solve (RK4 in lambda, 100-150 steps,
    which agree with 500 steps),
    12 cases: V 64..16384, C 8 / 32, unit-norm rows or N(0, s^2) rows with s = 0.05..3, p Dirichlet,
    peaked (softmax of 3 x N(0,1) logits) or top-k; 400..2000 noises each; mean / worst case:
        adaptive                              2.5% /  6.0%  (worst: V 16384, C 8, peaked p)
        logsnr (lambda uniform, t .01-.99)   12.7% / 29.0%
        time (t uniform, .01-.99)            71.7% / 99.3%
        DPM-Solver-style start at t = 1e-3 from the noise, last evaluation at t = .999:
          lambda uniform 20.1% / 46.0%, t uniform 72.4% / 100%
    The adaptive window constants were picked on a grid (before 0.75/1/1.25 x after 1.5/1.75/2:
    mean 2.5-3.1%); starting at t = 0 instead of 1e-3 alone took lambda-uniform from 20% to 13%.

    Total variation of the histogram of 5e4 mapped noises from p (an exact multinomial draw of the
    same size: mean of 5 draws) -- adaptive / logsnr / time:
        V 16,    C 8,  N(0,1) rows, Dirichlet   0.010 / 0.011 / 0.013   (multinomial 0.006)
        V 256,   C 32, unit rows,   peaked      0.010 / 0.020 / 0.159   (multinomial 0.011)
        V 1024,  C 8,  unit rows,   peaked      0.029 / 0.115 / 0.818   (multinomial 0.024)
        V 4096,  C 8,  unit rows,   top-300     0.027 / 0.060 / 0.353   (multinomial 0.029)
        V 4096,  C 32, N(0,.5^2),   Dirichlet   0.102 / 0.138 / 0.234   (multinomial 0.100)
        V 16384, C 8,  unit rows,   Dirichlet   0.202 / 0.249 / 0.424   (multinomial 0.202)
    float64 instead of float32 changed no index in any of these cases (endpoints moved <= 2e-3).
    """
    if schedule == "adaptive":
        spread, resolution = codebook_scale(codebook)
        lo = -math.log(spread) - WINDOW_BEFORE
        hi = max(-math.log(resolution) + WINDOW_AFTER, lo + 1.0)
        return time_grid(nfe, lo, hi, "logsnr")
    if schedule in ("logsnr", "time"):
        return time_grid(nfe, *FIXED_LAMBDA, schedule)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def _lam(t: float) -> float:
    return -math.inf if t == 0.0 else math.log(t) - math.log1p(-t)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------------------------
# The closed-form model: posterior over codes and data prediction
# ----------------------------------------------------------------------------------------------

class FlowCodebook:
    """A [V, C] codebook prepared once for the solver.

    ``logits`` / ``predict`` are the model as written above (the reference form, ``dpm_solver_pp``'s
    ``predict``); ``plan`` holds what ``_fused_solve``, the form ``flow_map`` runs, prepares once per
    time grid.
    """

    def __init__(self, codebook: torch.Tensor, dtype: torch.dtype = torch.float32):
        book = codebook.detach().to(dtype)
        self.code_sq = book.pow(2).sum(-1)                                         # [V]
        # [C, V]-contiguous: x @ book_t and the skinny w @ book_t.T are up to 3x faster on CPU that way
        self.book_t = book.T.contiguous()
        self.book = self.book_t.T                                                 # [V, C] view of it
        self._plans: dict = {}

    @classmethod
    def of(cls, codebook: torch.Tensor, dtype: torch.dtype) -> "FlowCodebook":
        """The prepared codebook, cached per codebook tensor and dtype (invalidated by in-place changes):
        a teacher step of a small batch maps only a few dozen tokens, so per-call set-up shows."""
        return _cached_per_tensor(_BOOK_CACHE, codebook, dtype, lambda: cls(codebook, dtype))

    def logits(self, y: torch.Tensor, t: float, logp: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[N, V] log w_j(x_t) up to a per-row constant, for the state y = x_t / (1-t) [N, C] and log p [N, V]:
        log p_j + s x.c_j - s t |c_j|^2 / 2 with s = t / (1-t)^2, i.e. s x.c_j = t / (1-t) y.c_j."""
        scale = t / (1.0 - t) ** 2
        return torch.add(logp, self.code_sq, alpha=-0.5 * t * scale, out=out).addmm_(y, self.book_t,
                                                                                     alpha=t / (1.0 - t))

    def predict(self, y: torch.Tensor, t: float, p: torch.Tensor, mass: torch.Tensor, logp: torch.Tensor,
                buffer: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """D(x_t, t) = E[x1 | x_t] = softmax(logits) @ codebook, [N, C], for y = x_t / (1-t) (the solver's
        state), written into ``out`` if given. ``mass`` = p.sum(-1, keepdim=True)."""
        if t == 0.0:                         # the posterior is the prior: D is the p-weighted mean
            return torch.mm(p, self.book, out=out).div_(mass)
        return torch.mm(torch.softmax(self.logits(y, t, logp, out=buffer), dim=-1), self.book, out=out)

    def plan(self, times: tuple[float, ...], order: int) -> list[tuple[float, torch.Tensor | None]]:
        """Per solver step: (evaluation time, the weights [order] of the prediction ring buffer in the
        update of y, None at the end). Built once per grid and order from ``_solver_plan``."""
        key = (times, order)
        if key not in self._plans:
            steps = []
            for i, (s, weights) in enumerate(_solver_plan(times, order)):
                w = None
                if weights is not None:      # weights[j] goes with the prediction of step i - j
                    w = self.code_sq.new_zeros(order)
                    for j, wj in enumerate(weights):
                        w[(i - j) % order] = wj
                steps.append((s, w))
            self._plans[key] = steps
        return self._plans[key]

    def nearest(self, x: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
        """Index of the nearest row to x [N, C] among those not ``blocked`` [N, V] (bool, p_j = 0; None:
        every row allowed)."""
        dist = torch.addmm(self.code_sq, x, self.book_t, alpha=-2.0)   # |c|^2 - 2 x.c (+|x|^2)
        return (dist if blocked is None else dist.masked_fill_(blocked, math.inf)).argmin(-1)


_BOOK_CACHE = WeakIdKeyDictionary()
_TIMES_CACHE = WeakIdKeyDictionary()     # the time grid per codebook tensor, nfe and schedule


def dpm_solver_pp(noise: torch.Tensor, predict, times: list[float], order: int = 3) -> torch.Tensor:
    """Multistep DPM-Solver++ (data prediction) from x(times[0]) = noise along ``times``.

    ``predict(y, t)`` is the data prediction D(x_t, t), given the state as y = x / (1 - t): in that
    variable the exponential-integrator update is y' = y + sum_k w_k D_k, with no rescaling of the
    state at every step (a tensor op saved per step, which shows on small batches). It is called at
    times[:-1] (len(times) - 1 NFE). If the last time is 1 (sigma = 0) the last step returns the data
    prediction itself, otherwise x there. The update of order k integrates exactly the polynomial in
    lambda through the last k predictions (Taylor form); a prediction at t = 0 (lambda = -inf)
    carries no slope, so it lowers the order of the next two steps.
    """
    y = noise if times[0] == 0.0 else noise / (1.0 - times[0])
    hist: list[torch.Tensor] = []            # past predictions, newest last
    plan = _solver_plan(tuple(times), order)
    for s, weights in plan:
        hist = (hist + [predict(y, s)])[-order:]
        if weights is None:                  # the end, t = 1: the data prediction itself
            return hist[-1]
        y = torch.add(y, hist[-1], alpha=weights[0])   # a new tensor: never write into ``noise``
        for w, d in zip(weights[1:], reversed(hist[:-1])):
            y.add_(d, alpha=w)
    return y * (1.0 - times[-1])


@functools.lru_cache(maxsize=64)
def _solver_plan(times: tuple[float, ...], order: int) -> list[tuple[float, tuple[float, ...] | None]]:
    """Per step of ``dpm_solver_pp``: (evaluation time, weights of the newest predictions in the update
    of y = x / (1 - t)), weights None for a last step that ends at t = 1. Pure Python, computed once
    per grid and order: a pair-generation step of a small batch is a few hundred microseconds."""
    lams = [_lam(t) for t in times[:-1]]
    plan = []
    for i in range(len(times) - 1):
        s, t = times[i], times[i + 1]
        if t >= 1.0:
            plan.append((s, None))
            break
        usable = 1 + sum(1 for j in range(max(0, i - 2), i) if lams[j] > -math.inf)
        k = min(i + 1, order, usable)
        # x_t = (sigma_t / sigma_s) x_s + sum_k c_k D_k  <=>  y_t = y_s + sum_k (c_k / sigma_t) D_k
        coefs = _update_coefficients(lams[max(0, i - 2):i + 1], _lam(t), t, k)
        plan.append((s, tuple(c / (1.0 - t) for c in coefs)))
    return plan


def _update_coefficients(lams: list[float], lam_t: float, t: float, k: int) -> list[float]:
    """Weights of the newest k predictions (newest first) in the step from lams[-1] to lam_t.

    Exact solution: x_t = (sigma_t / sigma_s) x_s + sigma_t * int_{lam_s}^{lam_t} e^lam D(lam) dlam.
    With D(lam_s + r) = D + r D' + r^2/2 D'' and h = lam_t - lam_s this is
    x_t = ratio x_s + t [(1 - e^-h) D + h phi2 D' - h^2 phi3 D''], where D', D'' come from backward
    differences of the predictions.
    """
    h = lam_t - lams[-1]
    phi1 = math.expm1(-h)                        # e^-h - 1
    phi2 = phi1 / h + 1.0                        # (e^-h - 1 + h) / h
    phi3 = phi2 / h - 0.5                        # (e^-h - 1 + h - h^2/2) / h^2
    a = -t * phi1                                # on D
    b = t * h * phi2                             # on D'
    c = -t * h * h * phi3                        # on D''
    if k == 1:
        return [a]
    h0 = lams[-1] - lams[-2]
    if k == 2:                                   # D' ~ (D_0 - D_1) / h0
        return [a + b / h0, -b / h0]
    h1 = lams[-2] - lams[-3]
    # slope0 = (D_0 - D_1)/h0, slope1 = (D_1 - D_2)/h1, D'' = 2 (slope0 - slope1)/(h0 + h1),
    # D' = slope0 + h0/2 D''  =>  b D' + c D'' = (b + q) slope0 - q slope1
    q = (b * h0 / 2 + c) * 2.0 / (h0 + h1)
    return [a + (b + q) / h0, -(b + q) / h0 - q / h1, q / h1]


def _fused_solve(x: torch.Tensor, p: torch.Tensor, mass: torch.Tensor, logp: torch.Tensor, book: FlowCodebook,
                 times: tuple[float, ...], order: int) -> torch.Tensor:
    """``dpm_solver_pp(x, book.predict, times, order)`` in fewer tensor ops: the end point [N, C].

    Predictions (``FlowCodebook.predict``) go straight into a ring buffer of ``order`` slots, and the
    update y += sum_k w_k D_k is one addmv over it with weights prepared per grid (``FlowCodebook.plan``).
    Per evaluation: add + addmm_ (the logits), softmax, mm, addmv, where ``dpm_solver_pp``'s generic
    update takes 6-8 ops; on the small batches of pair generation the per-op overhead is most of the
    cost (tested equal to the reference solve).
    """
    n, C = x.shape
    t0 = times[0]
    y = x.clone(memory_format=torch.contiguous_format)  # the state y = x / (1 - t); never write into x
    if t0 != 0.0:
        y.div_(1.0 - t0)
    ring = x.new_zeros(order, n, C)                     # zeros: a weight 0 on an unwritten slot stays 0
    slots, ring_t, y_flat = ring.unbind(0), ring.view(order, -1).T, y.view(-1)
    buffer = torch.empty_like(logp)
    for i, (s, w) in enumerate(book.plan(times, order)):
        d = book.predict(y, s, p, mass, logp, buffer, out=slots[i % order])
        if w is None:                        # the end, t = 1: the data prediction itself
            return d
        y_flat.addmv_(ring_t, w)
    return y * (1.0 - times[-1])


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

def flow_map(noise: torch.Tensor, probs: torch.Tensor, codebook: torch.Tensor, nfe: int = 10,
             order: int = 3, *, return_endpoint: bool = False, schedule: str = DEFAULT_SCHEDULE,
             chunk_rows: int | None = None):
    """Codebook indices [...] (long) that the noise tokens [..., C] map to under p [..., V].

    ``codebook`` is [V, C]. ``probs`` rows are probability vectors (they are renormalised; zero
    entries are allowed and never returned); any shape that broadcasts to [..., V], e.g. the view
    ``p.expand(N, V)``, is used without being materialised. Works in float32 (float64 if the noise
    is float64) on the inputs' device, ``chunk_rows`` rows at a time (default: about
    CHUNK_ELEMENTS / V). ``nfe`` evaluations of the data prediction, the first at t = 0, multistep
    DPM-Solver++ of ``order`` 1-3 on the ``schedule`` grid (``solver_times``). Deterministic: the
    same call gives the same indices; other chunk sizes change the arithmetic only at rounding level
    (a noise within rounding of a decision boundary could flip, none did in the tests).
    With ``return_endpoint=True`` returns (indices, end point [..., C] before snapping).
    """
    idx, end = _run(noise, probs, codebook, nfe, order, schedule, chunk_rows, want_endpoint=return_endpoint)
    return (idx, end) if return_endpoint else idx


def flow_map_endpoint(noise: torch.Tensor, probs: torch.Tensor, codebook: torch.Tensor, nfe: int = 10,
                      order: int = 3, *, schedule: str = DEFAULT_SCHEDULE,
                      chunk_rows: int | None = None) -> torch.Tensor:
    """The solver's end point [..., C] (the data prediction at the last step, before snapping)."""
    return _run(noise, probs, codebook, nfe, order, schedule, chunk_rows, want_endpoint=True)[1]


@contextmanager
def _full_precision_matmul(device: torch.device):
    """TF32 (10-bit mantissa) would blur x.c near t = 1, where the logits are divided by (1-t)^2."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _check(noise, probs, codebook, nfe, order) -> tuple[int, int]:
    for name, v in (("noise", noise), ("probs", probs), ("codebook", codebook)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be [V, C], got shape {tuple(codebook.shape)}")
    V, C = codebook.shape
    if noise.dim() < 1 or noise.shape[-1] != C:
        raise ValueError(f"noise must be [..., C] with C = {C} (codebook is [{V}, {C}]), got shape {tuple(noise.shape)}")
    want = (*noise.shape[:-1], V)
    if probs.dim() < 1 or probs.shape[-1] != V:
        raise ValueError(f"probs must be [..., V] with V = {V} (codebook is [{V}, {C}]), got shape {tuple(probs.shape)}")
    fits = probs.shape == want               # the common case; broadcast_shapes costs ~0.1 ms
    if not fits:
        try:
            fits = torch.broadcast_shapes(probs.shape, want) == want
        except RuntimeError:
            fits = False
    if not fits:
        raise ValueError(f"probs must have shape {want} (noise's leading dims + V) or broadcast to it, "
                         f"got {tuple(probs.shape)}")
    if not (noise.device == probs.device == codebook.device):
        raise ValueError(f"noise, probs and codebook must be on one device, got {noise.device}, "
                         f"{probs.device}, {codebook.device}")
    if not isinstance(order, int) or not 1 <= order <= 3:
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if not isinstance(nfe, int) or nfe < order:
        raise ValueError(f"nfe must be an integer >= order ({order}), got {nfe!r}")
    return V, C


def _run(noise, probs, codebook, nfe, order, schedule, chunk_rows, want_endpoint):
    V, C = _check(noise, probs, codebook, nfe, order)
    lead = noise.shape[:-1]
    n = math.prod(lead)
    times = _cached_per_tensor(_TIMES_CACHE, codebook, (nfe, schedule),
                               lambda: tuple(solver_times(nfe, codebook, schedule)))
    work = torch.float64 if noise.dtype == torch.float64 else torch.float32
    book = FlowCodebook.of(codebook, work)
    x_all = noise.reshape(n, C).to(work)
    p_rows = _row_getter(probs.expand(*lead, V), n, V)
    if chunk_rows is None:
        budget = CHUNK_ELEMENTS_CUDA if noise.device.type == "cuda" else CHUNK_ELEMENTS
        chunk_rows = max(1, budget // V)
    elif chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")

    if n == 0:
        return (torch.empty(lead, dtype=torch.long, device=noise.device),
                noise.new_empty(noise.shape) if want_endpoint else None)
    with torch.no_grad(), _full_precision_matmul(noise.device):
        if n <= chunk_rows:                  # one chunk (every pair-generation step of a normal batch)
            idx, end, ok = _map_rows(x_all, p_rows(0, n).to(work), book, times, order)
        else:
            # preallocated outputs: small per-chunk results kept alive between the big [rows, V]
            # temporaries fragment the heap (measured: +0.3-0.5 GB peak on the 8000 x 16384 test problem)
            idx = torch.empty(n, dtype=torch.long, device=noise.device)
            end = torch.empty(n, C, dtype=work, device=noise.device) if want_endpoint else None
            ok = True
            for a in range(0, n, chunk_rows):
                b = min(n, a + chunk_rows)
                idx[a:b], x1, chunk_ok = _map_rows(x_all[a:b], p_rows(a, b).to(work), book, times, order)
                if end is not None:
                    end[a:b] = x1
                ok = ok & chunk_ok
    if not bool(ok):
        bad = sum(int((~(((r >= 0) & (r <= 1)).all(-1) & (r.sum(-1) > 0))).sum())
                  for r in (p_rows(a, min(n, a + chunk_rows)) for a in range(0, n, chunk_rows)))
        raise ValueError(f"probs: {bad} of {n} rows are not probability vectors "
                         f"(entries must lie in [0, 1] and each row must have positive mass)")
    return idx.view(lead), (end.view(*lead, C).to(noise.dtype) if want_endpoint else None)


def _map_rows(x: torch.Tensor, p: torch.Tensor, book: FlowCodebook, times: tuple[float, ...], order: int):
    """Solve one chunk: (indices [rows], end points [rows, C], whether p's rows are probability vectors).

    The check (every entry in [0, 1], a NaN fails both, and some mass in every row) is a Python bool
    on the CPU (two reductions and three scalar reads: cheaper than five more tensor ops on a small
    step) and a 0-dim tensor elsewhere, read once by the caller at the end (no device sync per chunk).
    """
    mass = p.sum(-1, keepdim=True)
    lo, hi = torch.aminmax(p)
    low_mass = mass.amin()
    if p.device.type == "cpu":
        smallest = lo.item()
        ok = smallest >= 0 and hi.item() <= 1 and low_mass.item() > 0
        any_zero = smallest <= 0             # known here for free: no zero, no masking ops at all
    else:
        ok = (lo >= 0) & (hi <= 1) & (low_mass > 0)
        any_zero = True
    blocked = p <= 0 if any_zero else None
    # log(0) takes a slow path in the vectorised log (4x slower with top-k zeros): fill the -inf in afterwards
    logp = torch.where(blocked, 1.0, p).log_().masked_fill_(blocked, -math.inf) if any_zero else p.log()
    x1 = _fused_solve(x, p, mass, logp, book, times, order)
    return book.nearest(x1, blocked), x1, ok


def _row_getter(probs: torch.Tensor, n: int, V: int):
    """(a, b) -> rows a..b of probs flattened to [n, V], without materialising a broadcast view."""
    try:
        flat = probs.view(n, V)
        return lambda a, b: flat[a:b]
    except RuntimeError:
        pass
    lead = probs.shape[:-1]

    def rows(a, b):
        r = torch.arange(a, b, device=probs.device)
        return probs[torch.unravel_index(r, lead)]
    return rows
