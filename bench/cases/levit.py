"""LeViT inference: our `levit_*_fused` against timm's `levit_*` with the same weights, eager and torch.compile'd.

Cases: levit_128s.infer and levit_256.infer.
    CPU:  batch 16 at 224x224, fp32 (the LeViT paper's CPU protocol), and LeViT-128S also at batch 1 (latency); run
          `resnas bench --case levit --threads 1` and `--threads 2` for the two thread counts.
    CUDA: batch 256 and 2048 at 224x224 under bf16 autocast (quick: 256 only).
    quick: LeViT-128S only, without `ours_compiled`; smoke: 128S at batch 1, eager providers and ONNX Runtime.
Providers (all eval mode under torch.inference_mode, same random weights with non-trivial BN statistics):
    ours           resnas_kernels.models.levit: BN folded into every conv/linear and the two heads averaged into one
                   linear; on CUDA the attention through resnas_kernels.ragged_attention; on CPU the linears as
                   MKL GEMMs with in-place Hardswish / residual epilogues, the image conv through oneDNN with
                   Hardswish fused (models/levit/onednn.py), the attention through the fused C++ kernel
    ours_compiled  torch.compile(ours)
    timm           timm's model, eager (its gathered bias cached per device, BN not folded)
    timm_compiled  torch.compile(timm's model), default mode
    onnxruntime    CPU only, optional (the `onnx` extra): timm's model exported by torch.onnx.export (TorchScript
                   exporter, opset 17, static batch), run by an ONNX Runtime session with intra-op threads = the
                   run's torch thread count and `session.intra_op.allow_spinning = 0`; when onnx / onnxruntime is
                   not installed the case runs without it and says so in the output and the CSV notes
torch.compile runs (and warms up) while the case is built, never inside a timed call. Inductor's CPU code is
specialised to the thread count at compile time, which is the run's pinned count (the runner pins threads before it
builds the cases).
FLOPs: `levit_flops` (2 per multiply-add of the convolutions, linears and attention matmuls; softmax and activations
not counted) for one averaged head, e.g. 0.61 GFLOP per image for 128S; the same count divides every provider's time.
Bytes: a floor: the fp32 weights read once, the images read once, the logits written.
Before timing, every provider's logits must agree with timm's.
"""
from __future__ import annotations

import functools
import importlib.util
import io
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from resnas_kernels.bench.harness import Case, LazyCase
from resnas_kernels.models import levit as L

VARIANTS = ("levit_128s", "levit_256")


@torch.no_grad()
def random_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial BN statistics/affines and bias tables (timm initialises some gammas and all tables to 0), drawn
    from `seed`; works on timm's LeViT and ours alike (the tests use it too)."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            n = mod.num_features
            mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.copy_(torch.randn(n, generator=g) * 0.2)
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        if hasattr(mod, "attention_biases"):
            mod.attention_biases.copy_(torch.randn(mod.attention_biases.shape, generator=g))
    return model


def _infer(model: Callable, x: torch.Tensor, autocast: bool) -> Callable[[], torch.Tensor]:
    device_type = x.device.type

    def call():
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            return model(x)

    return call


def _check_agree(outputs: Dict[str, torch.Tensor], bf16: bool, what: str) -> None:
    """Same weights, same function: every provider's logits must match timm's eager ones."""
    ref = outputs["timm"].float()
    scale = max(1.0, ref.abs().max().item())
    tol = 5e-2 if bf16 else 1e-3  # relative to the largest logit; bf16 carries ~3 significant digits
    for name, out in outputs.items():
        err = (out.float() - ref).abs().max().item() / scale
        if not err <= tol:
            raise RuntimeError(f"{what}: provider {name!r} differs from timm by {err:.3g} (relative, tolerance {tol})")


def onnxruntime_missing() -> Optional[str]:
    """Why the ONNX Runtime peer cannot run here, or None when it can."""
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install 'resnas-kernels[onnx]')"
    return None


def _onnxruntime(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """timm's model exported with torch.onnx (TorchScript exporter: works offline, no onnxscript), run by an ONNX
    Runtime CPU session at the run's thread count, as a deployment would configure it."""
    import onnxruntime as ort

    onnx_model = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (x,), onnx_model, dynamo=False, input_names=["images"], output_names=["logits"],
                          opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Idle ORT threads spin by default and take the cores from whatever runs next (the other providers here).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(onnx_model.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"images": x.numpy()}
    return lambda: torch.from_numpy(session.run(None, feed)[0])


def _providers(ctx, compile_ours: bool) -> Tuple[str, ...]:
    """The provider names `_case` builds (what --list shows)."""
    names = ("ours", "timm") + ("ours_compiled",) * compile_ours + ("timm_compiled",) * (not ctx.smoke)
    return names + ("onnxruntime",) * (ctx.device.type == "cpu" and onnxruntime_missing() is None)


def _case(variant: str, batch: int, ctx, compile_ours: bool, compile_timm: bool) -> Case:
    import timm

    device = ctx.device
    cuda = device.type == "cuda"
    ref = random_weights(timm.create_model(variant), seed=0).to(device).eval()
    ours = timm.create_model(f"{variant}_fused").to(device)
    ours.load_state_dict(ref.state_dict())
    ours.fuse()  # eval() + folded weights built now
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    providers = {"ours": _infer(ours, x, cuda), "timm": _infer(ref, x, cuda)}
    if compile_ours:
        providers["ours_compiled"] = _infer(torch.compile(ours), x, cuda)
    if compile_timm:
        providers["timm_compiled"] = _infer(torch.compile(ref), x, cuda)
    skipped = {}
    if cuda:
        skipped["onnxruntime"] = "CPU peer only (the CUDA execution provider is not set up here)"
    elif onnxruntime_missing() is not None:
        skipped["onnxruntime"] = onnxruntime_missing()
    else:
        providers["onnxruntime"] = _onnxruntime(ref, x)
    # The first calls compile and warm up (outside any timing) and give the logits for the agreement check.
    outputs = {name: fn() for name, fn in providers.items()}
    outputs = {name: fn() for name, fn in providers.items()}
    _check_agree(outputs, cuda, f"{variant}.infer B={batch}")

    weight_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    nbytes = weight_bytes + x.numel() * x.element_size() + batch * ours.num_classes * 4
    backend = "attention: " + ("chunked batched GEMMs" if not cuda and L.levit.CPU_INFERENCE_GEMM_ATTENTION
                                else "ragged_attention")
    return Case(name=f"{variant}.infer", shape=f"B={batch},224", dtype="bf16-autocast" if cuda else "float32",
                flops=L.levit_flops(ours, batch), bytes=nbytes, providers=providers, baseline="ours",
                op="ragged_attention" if cuda else None, items=batch, skipped=skipped,
                backends={"onnxruntime": "onnxruntime"}, notes=f"random weights, non-trivial BN stats; {backend}")


def cases(ctx) -> List[LazyCase]:
    if ctx.smoke:
        shapes = [("levit_128s", 1)]
    elif ctx.device.type == "cuda":
        batches = (256,) if ctx.quick else (256, 2048)
        shapes = [(v, b) for v in (VARIANTS[:1] if ctx.quick else VARIANTS) for b in batches]
    else:  # batch 1 (latency) and 16 (the paper's CPU protocol) for 128S, the one ONNX Runtime is compared on
        shapes = [("levit_128s", 1), ("levit_128s", 16)] + [(v, 16) for v in VARIANTS[1:]] * (not ctx.quick)
    compile_ours = not (ctx.quick or ctx.smoke)
    dtype = "bf16-autocast" if ctx.device.type == "cuda" else "float32"
    return [LazyCase(f"{v}.infer", f"B={b},224", dtype, _providers(ctx, compile_ours),
                     functools.partial(_case, v, b, ctx, compile_ours=compile_ours, compile_timm=not ctx.smoke))
            for v, b in shapes]
