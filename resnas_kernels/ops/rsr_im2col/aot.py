"""Ahead-of-time compilation cases of the Triton kernels (`resnas aot`): the dtypes and tiles a GPU runs."""
from ...aot import register_aot
from .triton_kernels import _BWD_BLOCK_C, _FWD_BLOCK, _rsr_im2col_bwd_kernel, _rsr_im2col_fwd_kernel

for _dt in ("fp32", "bf16", "fp16"):
    _ints = ("num_groups", "C", "H", "W", "Wo", "L", "n_cls", "stride", "padding")
    _fwd_sig = {"U": f"*{_dt}", "COLS": f"*{_dt}", "SAMPLE_STARTS": "*i32", "WIDTHS": "*i32",
                **{n: "i32" for n in _ints}, "KSIZE": "constexpr", "BLOCK": "constexpr"}
    register_aot(_rsr_im2col_fwd_kernel, _fwd_sig, {"KSIZE": 3, "BLOCK": _FWD_BLOCK}, num_warps=4)
    _ints = ("num_groups", "C", "H", "W", "Ho", "Wo", "L", "n_cls", "stride", "padding")
    _bwd_sig = {"DCOLS": f"*{_dt}", "DU": f"*{_dt}", "SAMPLE_STARTS": "*i32", "WIDTHS": "*i32",
                **{n: "i32" for n in _ints},
                "KSIZE": "constexpr", "BLOCK_C": "constexpr"}
    register_aot(_rsr_im2col_bwd_kernel, _bwd_sig, {"KSIZE": 3, "BLOCK_C": _BWD_BLOCK_C}, num_warps=4)
