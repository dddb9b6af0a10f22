"""LeViT (Graham et al., ICCV 2021) on resnas-kernels' fused attention, weight-compatible with timm's `levit_*`.

Spec: `shared/reference/levit.md`. Architecture (timm's `levit_*` = facebookresearch/LeViT `LeViT_*`): a stride-16
conv stem (4 x Conv3x3-s2 + BN, Hardswish between), three stages of residual [attention + MLP(ratio 2)] blocks at
14x14 / 7x7 / 4x4 tokens, a shrink attention (queries on the stride-2 grid, V dim 4D, no residual) + MLP between
stages, every projection a bias-free Linear followed by BatchNorm, Hardswish everywhere, mean pool and two BN+Linear
heads (class and distillation) averaged at inference. Each attention adds a learned per-head bias B[h, |dy|*R + |dx|]
from an (H, R*R) table to the scaled scores.

Registered with timm on import (our own names, never timm's):
    levit_128s_fused, levit_128_fused, levit_192_fused, levit_256_fused, levit_384_fused

    import resnas_kernels.models, timm
    model = timm.create_model("levit_128s_fused")
    model.load_state_dict(timm.create_model("levit_128s").state_dict())   # timm's names and shapes, 1:1
    model.load_state_dict(checkpoint_filter_fn(torch.load("LeViT-128S.pth", weights_only=True), model))  # original repo

Modes:
- Training (`train()`): BatchNorm with batch statistics, as timm; the bias table gets its gradient through the fused
  kernel (`bias_grid`: the kernel computes |dy|*R + |dx| itself, no (Nq, Nk) index or bias tensor is built, and
  reduces the table's gradient deterministically).
- Inference (`eval()`, or `fuse()`, which is `eval()` that returns the model): every Conv/Linear + BatchNorm pair
  runs as ONE conv/linear with folded weights, W' = s*W and b' = beta - mean*s with s = gamma/sqrt(var + eps) (BN
  before Linear in the heads: W' = W*s, b' = W(beta - mean*s) + b; the two heads are averaged into one linear), and
  each attention gets its gathered (H, Nq, Nk) bias. These are cached on the layer, built by `eval()`: plain
  attributes, never saved in the state dict, dropped by `train()`, rebuilt after `.to()` / `.half()`, and rebuilt
  automatically when a source tensor changed in place (`load_state_dict`, an EMA update, an optimizer step while in
  eval mode), detected from the tensors' version counters; a copy made by `deepcopy` or pickling rebuilds its own.
  Writes through `.data` (`p.data.mul_(...)`) bypass the version counters and are NOT detected (catching them would
  need a checksum of every source on every call, a device sync on CUDA): after such a write call
  `model.clear_caches()`, or use `with torch.no_grad(): p.mul_(...)`, which is detected.
  Each layer's cache lives with its parameters, so `.to(device)` and DataParallel replicas (whose parameters are
  other tensors) get their own ("per device").
  Eager CPU fp32 inference (onednn.py): the folded linears are MKL GEMMs with Hardswish / the residual add applied
  in place, the 3-channel stem conv runs through oneDNN with a pre-packed weight and Hardswish fused, and the
  attention runs through the fused kernel with the cached gathered bias (the chunked batched GEMMs of onednn.py
  remain behind levit.CPU_INFERENCE_GEMM_ATTENTION); everywhere the attention reads q/k/v as strided views of the
  projections.
- Eval mode with gradients (grad enabled and parameters requiring grad, e.g. the official repo's fine-tuning, which
  trains with `model.train(False)`): the fold and the bias gather are computed on the fly, differentiably.
- `torch.compile`: works in both modes; the attention is an opaque custom op; compiled code uses the plain ops (no
  oneDNN calls) and reads the caches as built by `eval()`. After changing weights in place under a compiled model,
  call `fuse()` again (the version check runs only in eager mode).

Input size is fixed (224x224 for the registered models): the bias tables are tied to the token grid, and any other
size raises a ValueError naming the expected size.
"""
from .checkpoint import checkpoint_filter_fn
from .flops import levit_flops
from .folding import ConvNorm, LinearNorm, NormLinear
from .levit import (EVAL_DENSE_BIAS, MODEL_CFGS, Attention, AttentionDownsample, LevitFused,
                    levit_128_fused, levit_128s_fused, levit_192_fused, levit_256_fused, levit_384_fused,
                    levit_bias_index)
from .levit import _ATTENTION_OP, _attention_op  # noqa: F401  (tests swap the attention op through these)

__all__ = ["LevitFused", "Attention", "AttentionDownsample", "ConvNorm", "LinearNorm", "NormLinear", "MODEL_CFGS",
           "EVAL_DENSE_BIAS", "checkpoint_filter_fn", "levit_flops", "levit_bias_index",
           "levit_128s_fused", "levit_128_fused", "levit_192_fused", "levit_256_fused", "levit_384_fused"]
