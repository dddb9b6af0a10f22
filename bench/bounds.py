"""The fastest a benchmark case could run on an H200: its useful FLOPs and minimum bytes against the chip's peaks.

bound = max(flops / peak FLOP/s, bytes / copy bandwidth), with the case's own `flops` and `bytes` (our ragged work,
bench/harness.py). A CUDA measurement is then reported as a fraction of that bound (`pct_h200_bound` rows of the CSV,
`%bound` in the printed table), not only as a ratio to a peer. The peaks, and which numbers they are:
- bf16 / fp16: 790 TFLOP/s, an 8192^3 bf16 matrix product through PyTorch on random data, measured on this
  workplace's H200 (the datasheet's dense bf16 figure is 989 TFLOP/s);
- fp32: 67 TFLOP/s, the datasheet's plain (non-tensor-core) FP32 rate: our fp32 kernels use IEEE fp32 dots at
  PyTorch's default matmul precision ("highest"); TF32 tensor cores (494.7 TFLOP/s dense by the datasheet) apply
  only when torch.get_float32_matmul_precision() is not "highest";
- memory: 4.3 TB/s, a large device-to-device copy measured on the same machine, counting bytes read plus written
  (the datasheet's 4.8 TB/s is not reached by a copy).
"""
from typing import Tuple

H200_BF16_FLOPS = 790e12
H200_FP32_FLOPS = 67e12
H200_TF32_FLOPS = 494.7e12
H200_COPY_BYTES = 4.3e12

_HALF = ("bfloat16", "float16", "bf16", "fp16", "bf16-autocast", "fp16-autocast")


def peak_flops(dtype: str) -> float:
    return H200_BF16_FLOPS if str(dtype).replace("torch.", "") in _HALF else H200_FP32_FLOPS


def bound_ms(flops: int, nbytes: int, dtype: str) -> Tuple[float, str]:
    """(lower-bound milliseconds on an H200, "compute" or "memory": which term sets it)."""
    compute = flops / peak_flops(dtype) * 1e3
    memory = nbytes / H200_COPY_BYTES * 1e3
    return (compute, "compute") if compute >= memory else (memory, "memory")


def pct_of_bound(flops: int, nbytes: int, dtype: str, measured_ms: float) -> float:
    """100 * bound / measured: 100 % would be the H200's peak for this case's work."""
    bound, _ = bound_ms(flops, nbytes, dtype)
    return 100.0 * bound / measured_ms if measured_ms > 0 else 0.0
