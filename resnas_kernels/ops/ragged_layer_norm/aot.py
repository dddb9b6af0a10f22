"""Ahead-of-time compilation cases of the Triton kernels (`resnas aot`): the dtypes and tiles a GPU runs."""
from ...aot import register_aot
from .triton_kernels import _num_warps, _ragged_layer_norm_bwd_kernel, _ragged_layer_norm_fwd_kernel


def _aot_signature(dtype: str, weight_dtype: str):
    fwd = {"X": f"*{dtype}", "R": f"*{dtype}", "Y": f"*{dtype}", "Z": f"*{dtype}", "W": f"*{weight_dtype}",
           "B": f"*{weight_dtype}", "MEAN": "*fp32", "RSTD": "*fp32", "ROW_STARTS": "*i32", "WIDTHS": "*i32",
           "num_groups": "i32", "C_max": "i32", "eps": "fp32", "HAS_RESIDUAL": "constexpr", "BLOCK_C": "constexpr"}
    bwd = {"DY": f"*{dtype}", "DZ": f"*{dtype}", "Z": f"*{dtype}", "W": f"*{weight_dtype}", "MEAN": "*fp32",
           "RSTD": "*fp32", "DX": f"*{dtype}", "DW_PART": "*fp32", "DB_PART": "*fp32", "ROW_STARTS": "*i32",
           "WIDTHS": "*i32", "num_groups": "i32", "num_rows": "i32", "C_max": "i32", "HAS_DZ": "constexpr",
           "ROWS_PER_PROGRAM": "constexpr", "BLOCK_C": "constexpr"}
    return fwd, bwd


for _dt, _wdt in (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp32")):
    _fwd_sig, _bwd_sig = _aot_signature(_dt, _wdt)
    for _block in (256, 1024, 2048):
        register_aot(_ragged_layer_norm_fwd_kernel, _fwd_sig, {"HAS_RESIDUAL": True, "BLOCK_C": _block},
                     num_warps=_num_warps(_block))
        register_aot(_ragged_layer_norm_fwd_kernel, _fwd_sig, {"HAS_RESIDUAL": False, "BLOCK_C": _block},
                     num_warps=_num_warps(_block))
        register_aot(_ragged_layer_norm_bwd_kernel, _bwd_sig,
                     {"HAS_DZ": True, "ROWS_PER_PROGRAM": 16, "BLOCK_C": _block}, num_warps=_num_warps(_block))
        register_aot(_ragged_layer_norm_bwd_kernel, _bwd_sig,
                     {"HAS_DZ": False, "ROWS_PER_PROGRAM": 64, "BLOCK_C": _block}, num_warps=_num_warps(_block))
