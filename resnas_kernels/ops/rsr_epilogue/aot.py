"""Ahead-of-time compilation cases of the Triton kernels (`resnas aot`): the dtypes and tiles a GPU runs."""
from ...aot import register_aot
from .triton_kernels import (_BLOCK_C, _rsr_epilogue_bwd_kernel, _rsr_epilogue_colsum_kernel,
                             _rsr_epilogue_fwd_kernel)

for _dt, _pdt in (("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32")):
    _ints = {n: "i32" for n in ("num_groups", "Ci", "Co", "H", "W", "Wo", "L")}
    _fwd_sig = {"CONV": f"*{_dt}", "X": f"*{_dt}", "POS": f"*{_pdt}", "BIAS": f"*{_pdt}", "CLS": f"*{_dt}",
                "CLS_BIAS": f"*{_pdt}", "OUT": f"*{_dt}", "SAMPLE_STARTS": "*i32", "IN_WIDTHS": "*i32",
                "OUT_WIDTHS": "*i32", **_ints, "HAS_CLS": "constexpr", "STRIDE": "constexpr", "BLOCK_C": "constexpr"}
    _bwd_sig = {"DOUT": f"*{_dt}", "DCONV": f"*{_dt}", "DX": f"*{_dt}", "DCLS": f"*{_dt}", "SAMPLE_STARTS": "*i32",
                "IN_WIDTHS": "*i32", "OUT_WIDTHS": "*i32", **_ints, "HAS_CLS": "constexpr", "STRIDE": "constexpr",
                "BLOCK_C": "constexpr"}
    for _has_cls in (True, False):
        _consts = {"HAS_CLS": _has_cls, "STRIDE": 2, "BLOCK_C": _BLOCK_C}
        register_aot(_rsr_epilogue_fwd_kernel, _fwd_sig, _consts, num_warps=4)
        register_aot(_rsr_epilogue_bwd_kernel, _bwd_sig, _consts, num_warps=4)
    register_aot(_rsr_epilogue_colsum_kernel,
                 {"DOUT": f"*{_dt}", "SUMS": f"*{_pdt}", "SAMPLE_STARTS": "*i32", "OUT_WIDTHS": "*i32",
                  "num_groups": "i32", "n_out": "i32", "Co": "i32", "BLOCK_C": "constexpr"},
                 {"BLOCK_C": _BLOCK_C}, num_warps=4)
