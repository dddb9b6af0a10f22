"""Ahead-of-time compilation cases of the Triton kernels (`resnas aot`): the dtypes and tiles a GPU runs."""
import torch

from ...aot import register_aot
from .triton_kernels import (BIAS_DENSE_HEAD, BIAS_GRID, BIAS_INDEX, BIAS_NONE, _attn_bwd_dbias_kernel,
                             _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_small_kernel, _attn_fwd_small_kernel,
                             _attn_fwd_tiled_kernel, _bias_table_grad_kernel, _num_warps, _precision, _production_tile)


def _aot_signature(dtype: str, kernel: str):
    ptr = f"*{dtype}"
    strides = {n: "i32" for n in ("B", "Nq", "Nk", "H", "T", "Dqk", "Dv", "sqb", "sqn", "sqh", "skb", "skn", "skh",
                                  "svb", "svn", "svh")}
    tail = {"scale": "fp32", "grid_r": "i32", "grid_s": "i32", "grid_rq": "i32"}
    bias = {"WIDTHS": "*i32", "SAMPLE_GROUP": "*i64", "TABLE": "*fp32", "INDEX": "*i32", "DENSE": "*fp32"}
    const = {"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_DQK": "constexpr", "BLOCK_DV": "constexpr",
             "PRECISION": "constexpr", "BIAS_KIND": "constexpr"}
    if kernel == "fwd_small":
        return {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "LSE": "*fp32", **bias, **strides, **tail,
                "samples_per_program": "i32", **const}
    if kernel == "fwd_tiled":
        return {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "LSE": "*fp32", **bias, **strides, **tail, **const,
                "CHUNK_D": "constexpr"}
    if kernel == "bwd_small":
        return {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "DO": ptr, "LSE": "*fp32", "DQ": ptr, "DK": ptr, "DV": ptr,
                "DS_PART": "*fp32", **bias, **strides, **tail, "chunk": "i32", "HAS_DS": "constexpr", **const}
    if kernel == "bwd_dq":
        return {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DQ": ptr,
                **bias, **strides, **tail, **const, "CHUNK_D": "constexpr"}
    if kernel == "bwd_dkdv":
        return {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DK": ptr, "DV": ptr,
                **bias, **strides, **tail, **const, "CHUNK_D": "constexpr"}
    return {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DS_PART": "*fp32", **bias,
            **strides, **tail, "chunk": "i32", "n_tiles_n": "i32", **const, "CHUNK_D": "constexpr"}


def _register_aot_cases():
    kernels = {"fwd_small": _attn_fwd_small_kernel, "fwd_tiled": _attn_fwd_tiled_kernel,
               "bwd_small": _attn_bwd_small_kernel, "bwd_dq": _attn_bwd_dq_kernel,
               "bwd_dkdv": _attn_bwd_dkdv_kernel, "bwd_dbias": _attn_bwd_dbias_kernel}
    # Representative specialisations: LeViT (d 16 / v 32 with the table via the grid; d 32 / v 64 via an index),
    # ViT-ResNAS (d 64, no bias), a dense bias; bf16 for every kernel, fp16 for the forward ones, fp32 for the tiled
    # ones (fp32 never takes the small-N kernels); the small-N blocks below, the tiles `_production_tile` picks.
    configs = ((BIAS_GRID, 16, 32), (BIAS_NONE, 64, 64), (BIAS_INDEX, 32, 64), (BIAS_DENSE_HEAD, 64, 64))
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for name, kernel in kernels.items():
            small = name.endswith("small")
            if (dtype == "fp16" and not name.startswith("fwd")) or (small and dtype == "fp32"):
                continue
            for n, (bias, dqk, dv) in enumerate(configs):
                # small-N tiles (`_use_small`): the forward at 16 x 64 (shrink attention) and 64 x 64 (LeViT stage 2:
                # 49 tokens; a dense bias 16 x 64 only), the backward at 16 x 64 for sm_90 only, never a dense bias
                dense = bias == BIAS_DENSE_HEAD
                if name == "bwd_small" and dense:
                    continue  # a dense bias never takes the small backward
                for bm in ((16, 64) if name == "fwd_small" and not dense else (16,)) if small else (None,):
                    _register_one(kernel, name, dtype, torch_dtype, small, bm, bias, dqk, dv)
    register_aot(_bias_table_grad_kernel, {"DS_PART": "*fp32", "PERM": "*i32", "SEG": "*i32", "DTABLE": "*fp32",
                                           "n_chunks": "i32", "H": "i32", "T": "i32", "NQK": "i32",
                                           "BLOCK": "constexpr"}, {"BLOCK": 128}, num_warps=4)


def _register_one(kernel, name, dtype, torch_dtype, small, bm, bias, dqk, dv):
    """One AOT case: a small-N kernel at BLOCK_M = bm x 64 keys, or a tiled one at its production tile."""
    if small:
        bn, chunk_d = 64, None
    else:
        bm, bn, chunk_d = _production_tile(torch_dtype, "fwd" if name == "fwd_tiled" else name[4:])
    consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_DQK": dqk, "BLOCK_DV": dv, "PRECISION": _precision(torch_dtype),
              "BIAS_KIND": bias}
    if name == "bwd_small":
        consts["HAS_DS"] = bias != BIAS_NONE
    if chunk_d is not None:
        consts["CHUNK_D"] = chunk_d
    register_aot(kernel, _aot_signature(dtype, name), consts, num_warps=_num_warps(torch_dtype),
                 num_stages=1 if small else 2, archs=(90,) if name == "bwd_small" else None)


_register_aot_cases()
