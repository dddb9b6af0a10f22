"""Ahead-of-time compilation cases of the Triton kernels (`resnas aot`): the dtypes, epilogues and tiles a GPU runs."""
from ...aot import register_aot
from .triton_kernels import (_CANDIDATES, _DW_BLOCKS, _PROLOGUE_WARPS, _ragged_linear_bwd_prologue_kernel,
                             _ragged_linear_dw_kernel, _ragged_linear_dx_kernel, _ragged_linear_fwd_kernel)


def _aot_signatures(dt: str):
    fwd = {"X": f"*{dt}", "W": f"*{dt}", "BIAS": f"*{dt}", "RES": f"*{dt}", "SCALE": "*fp32", "Y": f"*{dt}",
           "PRE": f"*{dt}", "ROW_BLOCKS": "*i32", "ROW_STARTS": "*i32", "IN_W": "*i32", "OUT_W": "*i32",
           "K_max": "i32", "N_max": "i32", "seg_width": "i32", "col_tiles": "i32", "rows_per_sample": "i32",
           "HAS_BIAS": "constexpr", "GELU": "constexpr", "HAS_RESIDUAL": "constexpr", "HAS_ROW_SCALE": "constexpr",
           "SAVE_PRE": "constexpr", "PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
           "BLOCK_K": "constexpr"}
    prologue = {"DY": f"*{dt}", "PRE": f"*{dt}", "SCALE": "*fp32", "DR": f"*{dt}", "DP": f"*{dt}",
                "ROW_STARTS": "*i32", "OUT_W": "*i32", "num_groups": "i32", "num_rows": "i32", "N_max": "i32",
                "seg_width": "i32", "rows_per_sample": "i32", "GELU": "constexpr", "HAS_ROW_SCALE": "constexpr",
                "WRITE_DR": "constexpr", "WRITE_DP": "constexpr", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
    dx = {"DP": f"*{dt}", "W": f"*{dt}", "DX": f"*{dt}", "ROW_BLOCKS": "*i32", "ROW_STARTS": "*i32",
          "IN_W": "*i32", "OUT_W": "*i32", "K_max": "i32", "N_max": "i32", "seg_width": "i32", "num_segments": "i32",
          "PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr", "BLOCK_N": "constexpr"}
    dw = {"DP": f"*{dt}", "X": f"*{dt}", "DW": "*fp32", "DB": "*fp32", "ROW_STARTS": "*i32", "IN_W": "*i32",
          "OUT_W": "*i32", "num_groups": "i32", "K_max": "i32", "N_max": "i32", "seg_width": "i32",
          "rows_per_split": "i32", "HAS_BIAS": "constexpr", "PRECISION": "constexpr", "BLOCK_N": "constexpr",
          "BLOCK_K": "constexpr", "BLOCK_M": "constexpr"}
    return fwd, prologue, dx, dw


# Epilogue combinations the ViT-ResNAS / LeViT blocks use: (HAS_BIAS, GELU, HAS_RESIDUAL, HAS_ROW_SCALE, SAVE_PRE)
_AOT_EPILOGUES = (
    (True, False, False, False, False),   # qkv, plain linear
    (False, False, False, False, False),  # bias-free linear
    (True, True, False, False, True),     # fc1 + GELU, training (saves the pre-activation)
    (True, True, False, False, False),    # fc1 + GELU, inference
    (True, False, True, True, False),     # proj / fc2 + drop-path residual
    (True, False, True, False, False),    # proj / fc2 + residual
)
# The first tensor-core autotune candidate of each GEMM kernel, registered for every dtype and epilogue.
_FWD0, _DX0, _DW0 = (_CANDIDATES["tf32"][kind][0] for kind in ("fwd", "dx", "dw"))
_DW_TILE = dict(zip(("BLOCK_N", "BLOCK_K", "BLOCK_M"), _DW_BLOCKS))


def _register(kernel, signature, constexprs, candidate) -> None:
    kwargs, warps, stages = candidate
    register_aot(kernel, signature, {**constexprs, **kwargs}, num_warps=warps, num_stages=stages)


for _dt in ("fp32", "bf16", "fp16"):
    _fwd_sig, _pro_sig, _dx_sig, _dw_sig = _aot_signatures(_dt)
    _bm = 64 if _dt == "fp32" else 128
    for _bias, _gelu_on, _res, _scale, _save in _AOT_EPILOGUES:
        _register(_ragged_linear_fwd_kernel, _fwd_sig,
                  {"HAS_BIAS": _bias, "GELU": _gelu_on, "HAS_RESIDUAL": _res, "HAS_ROW_SCALE": _scale,
                   "SAVE_PRE": _save, "PRECISION": "tf32", "BLOCK_M": _bm, "BLOCK_N": 64}, _FWD0)
    for _gelu_on, _scale, _dr in ((True, False, False), (True, True, True), (False, True, True), (False, False, True)):
        register_aot(_ragged_linear_bwd_prologue_kernel, _pro_sig,
                     {"GELU": _gelu_on, "HAS_ROW_SCALE": _scale, "WRITE_DR": _dr, "WRITE_DP": _gelu_on or _scale,
                      "BLOCK_R": 32, "BLOCK_C": 128}, num_warps=_PROLOGUE_WARPS)
    _register(_ragged_linear_dx_kernel, _dx_sig, {"PRECISION": "tf32", "BLOCK_M": _bm, "BLOCK_K": 64}, _DX0)
    for _bias in (True, False):
        _register(_ragged_linear_dw_kernel, _dw_sig,
                  {"HAS_BIAS": _bias, "PRECISION": "tf32", **_DW_TILE}, _DW0)
    if _dt != "fp32":  # one row split: dW / db are written directly in the weight's dtype
        _register(_ragged_linear_dw_kernel, {**_dw_sig, "DW": f"*{_dt}", "DB": f"*{_dt}"},
                  {"HAS_BIAS": True, "PRECISION": "tf32", **_DW_TILE}, _DW0)
# Every autotune candidate at the heaviest epilogue (GELU, saving its input), for fp32 at 64 x 64 tiles in both
# precisions ("ieee": fp32 FMA dots at torch's default "highest" matmul precision) and for half types at 128 x 64,
# so the resource check sees every configuration a GPU may pick.
for _dt, _bm, _prec in (("fp32", 64, "tf32"), ("fp32", 64, "ieee"), ("bf16", 128, "tf32")):
    _fwd_sig, _, _dx_sig, _dw_sig = _aot_signatures(_dt)
    for _candidate in _CANDIDATES[_prec]["fwd"]:
        _register(_ragged_linear_fwd_kernel, _fwd_sig,
                  {"HAS_BIAS": True, "GELU": True, "HAS_RESIDUAL": False, "HAS_ROW_SCALE": False, "SAVE_PRE": True,
                   "PRECISION": _prec, "BLOCK_M": _bm, "BLOCK_N": 64}, _candidate)
    for _candidate in _CANDIDATES[_prec]["dx"]:
        _register(_ragged_linear_dx_kernel, _dx_sig, {"PRECISION": _prec, "BLOCK_M": _bm, "BLOCK_K": 64}, _candidate)
    for _candidate in _CANDIDATES[_prec]["dw"]:
        for _bias in (True, False):
            _register(_ragged_linear_dw_kernel, _dw_sig,
                      {"HAS_BIAS": _bias, "PRECISION": _prec, **_DW_TILE}, _candidate)
