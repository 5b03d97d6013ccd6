"""Fit the rational approximation behind the vector GELU (csrc/cpu/epilogue_simd.h).

erf(x / sqrt 2) ~ x * P(x^2) / Q(x^2) on 0 <= x <= C (P degree 6, Q degree 4, Q(0) = 1): linearised least
squares on Chebyshev + uniform nodes, reweighted (Lawson) towards the largest GELU error |x| * |err|,
then the scale u = x^2 / C^2 folded into the coefficients and everything rounded to float32. Prints
the coefficients and the float32 GELU error max |g - gelu| / max(|gelu|, 1) over [-8, 8], evaluated the
way the kernels do it (fma Horner, 1 - x P r with one rounding).

    python tools/fit_gelu.py
"""
import numpy as np
from scipy.special import erf

C = 5.6
M, Q_DEG = 6, 4


def fit(iters=60):
    s = C * C
    xs = np.concatenate([np.cos(np.linspace(0, np.pi, 8000)) * C / 2 + C / 2, np.linspace(0, C, 8000)])
    u, f = xs ** 2 / s, erf(xs / np.sqrt(2))
    w, best = np.ones_like(xs), None
    for _ in range(iters):
        a = np.concatenate([np.stack([xs * u ** i for i in range(M + 1)], 1),
                            np.stack([-f * u ** j for j in range(1, Q_DEG + 1)], 1)], 1)
        sol, *_ = np.linalg.lstsq(a * w[:, None], f * w, rcond=None)
        p, q = sol[:M + 1], np.concatenate([[1.0], sol[M + 1:]])
        qv = np.polyval(q[::-1], u)
        if qv.min() <= 0.05:
            break
        err = np.abs(xs * np.polyval(p[::-1], u) / qv - f) * np.maximum(xs, 1)
        if best is None or err.max() < best[0]:
            best = (err.max(), p, q)
        w = w * (1 + err / err.max())
        w /= w.mean()
    _, p, q = best
    fold = lambda c: [float(np.float32(v / s ** i)) for i, v in enumerate(c)]  # noqa: E731
    return fold(p), fold(q)


def gelu_error(pf, qf):
    f32 = np.float32
    x = np.linspace(-8, 8, 4000001).astype(f32)
    a = np.abs(x)
    ac = np.minimum(a, f32(C))
    t = (ac * ac).astype(f32)

    def horner(c):
        v = np.full_like(t, f32(c[-1]))
        for k in c[-2::-1]:
            v = (v.astype(np.float64) * t + np.float64(f32(k))).astype(f32)
        return v

    r = (f32(1) / horner(qf)).astype(f32)
    erfc = (1.0 - (ac * horner(pf)).astype(f32).astype(np.float64) * r).astype(f32)
    erfc = np.where(a > C, f32(0), erfc)
    g = (np.maximum(x, 0).astype(np.float64) - (f32(0.5) * a).astype(np.float64) * erfc).astype(f32)
    want = 0.5 * x.astype(np.float64) * (1 + erf(x.astype(np.float64) / np.sqrt(2)))
    return float((np.abs(g - want) / np.maximum(np.abs(want), 1)).max())


if __name__ == "__main__":
    pf, qf = fit()
    print("P:", ", ".join(f"{v:.9g}f" for v in pf))
    print("Q:", ", ".join(f"{v:.9g}f" for v in qf))
    print(f"float32 GELU error (relative to max(|gelu|, 1)) over [-8, 8]: {gelu_error(pf, qf):.3g}")
