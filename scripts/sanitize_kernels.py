"""Every CUDA C++ kernel and every Triton kernel of the library, once each, on small ragged shapes.

The workload `scripts/gpu_check.sh` runs under compute-sanitizer (memcheck, then racecheck): small enough to finish in
seconds under the sanitizer, ragged enough to leave partial tiles, an empty group and zero widths. Every call is
forward + backward and is compared with the plain PyTorch reference in fp64 (a loose bound: the sanitizer is the
check here, the test suite holds the tolerances). On CPU (`--device cpu`, the dry run) the same calls run on the C++
CPU backend, so the script itself is exercised where there is no GPU.

    python scripts/sanitize_kernels.py [--device auto|cuda|cpu]

Prints one line per (backend, call): ok, skip (backend unavailable, with why) or FAIL; exits 1 on any FAIL.
"""
import argparse
import sys
import traceback

import torch

import resnas_kernels as rk
from resnas_kernels import Ragged
from resnas_kernels import reference as ref
from resnas_kernels.backend import BackendUnavailableError
from resnas_kernels.ops.rsr_epilogue import rsr_epilogue
from resnas_kernels.ops.rsr_im2col import rsr_im2col

REL_TOL = 2e-3  # fp32 kernels against the fp64 reference, relative to the output's magnitude


def _run(fn, tensors, cotangent_seed: int):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(cotangent_seed)
    total = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
                for o in outs)
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return [o.detach() for o in outs] + [g for g in grads if g is not None]


def _compare(got, want, label):
    if len(got) != len(want):
        raise AssertionError(f"{label}: {len(got)} results, reference has {len(want)}")
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = a.double().cpu(), b.double().cpu()
        err = (a - b).abs().max().item() if a.numel() else 0.0
        if not err <= REL_TOL * max(1.0, b.abs().max().item() if b.numel() else 0.0):
            raise AssertionError(f"{label}: result {i} differs from the reference by {err:.3g}")


def calls(device):
    """(label, ops, kernel fn, reference fn, inputs); the reference fn runs under the reference backend."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    out = []
    # LayerNorm: C_max 200 (the CUDA warp-per-row kernels) and 1100 (the wide kernels), with a residual.
    for c in (200, 1100):
        g = Ragged((2, 0, 1, 2), (c, 5, 0, c - 7))
        mask = g.mask(c, device=device)[:, None, :]
        out.append((f"layer_norm C={c}", ("ragged_layer_norm",),
                    lambda x, r, w, b, g=g: rk.ragged_layer_norm(x, w, b, g, residual=r),
                    lambda x, r, w, b, g=g: ref.ragged_layer_norm(x, w, b, g, residual=r),
                    [randn(5, 9, c) * mask, randn(5, 9, c) * mask, randn(c), randn(c)]))
    # Linear: GELU, residual, drop-path row scale; K = N = 70 (partial tiles), k_g = 0 and n_g = 0 groups.
    g = Ragged((2, 0, 1, 1), (40, 9, 0, 70))
    n_w = (70, 5, 30, 0)
    scale = ((torch.rand(4, generator=gen) > 0.3).float() / 0.7).to(device)
    n_mask = (torch.arange(70)[None, :] < torch.tensor([70, 70, 30, 0])[:, None]).to(device)[:, None, :]
    out.append(("linear gelu+residual", ("ragged_linear",),
                lambda x, w, b, r: rk.ragged_linear(x, w, b, g, n_w, activation="gelu", residual=r, row_scale=scale),
                lambda x, w, b, r: ref.ragged_linear(x, w, b, g, n_w, activation="gelu", residual=r,
                                                     row_scale=scale.to(x.dtype)),
                [randn(4, 9, 70) * g.mask(70, device=device)[:, None, :], randn(70, 70, scale=0.12), randn(70),
                 randn(4, 9, 70) * n_mask]))
    # Attention: the small-N kernels (16 x 49, LeViT subsampling, table bias) and the tiled ones (81 x 81).
    heads = Ragged((2, 0, 1), (2, 1, 1))
    for (r, s), d, dv in (((7, 2), 16, 32), ((9, 1), 16, 32)):
        nq, nk = ((r - 1) // s + 1) ** 2, r * r
        out.append((f"attention {nq}x{nk} table", ("ragged_attention",),
                    lambda q, k, v, t, r=r, s=s: rk.ragged_attention(q, k, v, heads, bias_table=t, bias_grid=(r, s)),
                    lambda q, k, v, t, r=r, s=s: ref.ragged_attention(q, k, v, heads, bias_table=t, bias_grid=(r, s)),
                    [randn(3, nq, 2, d), randn(3, nk, 2, d), randn(3, nk, 2, dv), randn(2, r * r, scale=0.5)]))
    # RSR: the whole op (Triton / C++ CPU), and its im2col and epilogue sub-ops on their own (the CUDA C++ kernels).
    ci, co, grid = 40, 70, (5, 5)
    g_in = Ragged((1, 0, 2), (40, 5, 24))
    out_w = (70, 5, 30)
    x = randn(3, 26, ci) * g_in.mask(ci, device=device)[:, None, :]
    params = [randn(ci, scale=0.5) + 1, randn(ci, scale=0.5), randn(co, ci, 3, 3, scale=0.05), randn(co),
              randn(1, 9, co), randn(co, ci, scale=0.15), randn(co)]

    def rsr(fn):
        return lambda x, lw, lb, cw, cb, pos, clw, clb: fn(x, g_in, out_w, lw, lb, cw, cb, pos, clw, clb, grid=grid)
    out.append(("rsr", ("residual_spatial_reduction",), rsr(rk.residual_spatial_reduction),
                rsr(ref.residual_spatial_reduction), [x, *params]))
    out.append(("rsr im2col", ("rsr_im2col",), lambda u: rsr_im2col(u, g_in, grid, True),
                lambda u: rsr_im2col(u, g_in, grid, True), [x]))
    conv = randn(3, 9, co) * g_in.with_widths(out_w).mask(co, device=device)[:, None, :]
    cls = randn(3, 1, co) * g_in.with_widths(out_w).mask(co, device=device)[:, None, :]
    epi = (lambda conv, x, pos, cb, cls, clb: rsr_epilogue(conv, x, pos, cb, cls, clb, g_in, out_w, grid))
    out.append(("rsr epilogue", ("rsr_epilogue",), epi, epi,
                [conv, x, params[4], params[3], cls, params[6]]))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    backends = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    failures = 0
    for backend in backends:
        for label, _ops, fn, reference_fn, inputs in calls(device):
            try:
                with rk.use_backend("reference"):  # the sub-ops' own reference backends, backward included
                    want = _run(reference_fn, [t.double() for t in inputs], 1)
                with rk.use_backend(backend):
                    got = _run(fn, inputs, 1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                _compare(got, want, label)
                print(f"ok    {backend:7s} {label}", flush=True)
            except BackendUnavailableError as exc:
                print(f"skip  {backend:7s} {label}: {exc}", flush=True)
            except Exception as exc:  # report every call, then fail
                failures += 1
                print(f"FAIL  {backend:7s} {label}: {type(exc).__name__}: {exc}", flush=True)
                traceback.print_exc()
    print(f"sanitize_kernels: {failures} failed on {device}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
