"""`resnas info`: versions, devices, extension status and which backend each op will use."""
import argparse
import platform
from pathlib import Path

import torch

from . import _build_stamp, _ext
from .backend import BACKENDS, get_backend, resolve_backend, why_unavailable
from .ops import all_ops


def _source_root() -> Path:
    """The checkout an editable install runs from (for a regular install: site-packages, which has no csrc/)."""
    return Path(__file__).resolve().parents[1]


def collect() -> dict:
    module, why = _ext.load_extension()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    ops = {}
    for name, op in sorted(all_ops().items()):
        per_device = {}
        for dev in devices:
            try:
                chosen = resolve_backend(name, dev)
            except Exception as exc:  # a forced, unavailable backend: show why
                chosen = f"error: {exc}"
            per_device[dev.type] = {
                "uses": chosen,
                "unavailable": {b: why_unavailable(op, b, dev) for b in BACKENDS[1:]
                                if why_unavailable(op, b, dev) is not None},
            }
        ops[name] = per_device
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _ext.triton_version(),
        "triton_interpret": _ext.triton_interpreting(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "extension": "loaded" if module is not None else f"missing: {why}",
        "extension_cuda": _ext.extension_has_cuda(),
        "extension_sources": _build_stamp.source_status(_source_root()),
        "requested_backend": get_backend(),
        "ops": ops,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="resnas info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        import json

        print(json.dumps(info, indent=2))
        return 0
    from . import __version__

    print(f"resnas-kernels {__version__}")
    for key in ("python", "torch", "torch_cuda", "triton", "triton_interpret", "cpu_threads", "cpu_capability",
                "cuda_devices", "extension", "extension_cuda", "extension_sources", "requested_backend"):
        print(f"  {key:18s} {info[key]}")
    print("ops (backend used per device; unavailable backends and why):")
    for name, per_device in info["ops"].items():
        for dev, entry in per_device.items():
            print(f"  {name:28s} {dev:5s} -> {entry['uses']}")
            for backend, why in entry["unavailable"].items():
                print(f"  {'':28s}       {backend}: {why}")
    return 0
