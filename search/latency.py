"""Latency lookup table for the search's optional latency constraint (`resnas search --latency-budget MS`).

The paper constrains MACs only; MACs are a poor proxy for latency on a real device (attention, norms and small GEMMs
are bandwidth-bound). This table measures, on the current device and with this library's kernels (the ragged ops the
supernet runs, one group at the layer's exact width), the latency of every distinct layer a network of the space can
contain, and predicts a candidate's latency as the sum over its layers:

    stem/c{C1}                       conv trunk + im2col + projection to C1
    attn/n{N}/c{C}/h{H}/d{D}         LN1 + qkv + attention + proj with the residual
    mlp/n{N}/c{C}/m{M}               LN2 + fc1 (GELU) + fc2 with the residual
    rsr/g{G}/ci{Ci}/co{Co}           residual spatial reduction of a G x G grid
    head/c{C}/k{K}                   final LN of the cls token + classifier

A removed block costs nothing (the standalone network drops it). The sum ignores what the layers share (caches,
launch overlap), so it is an estimate used to rank and filter candidates, not a benchmark.

The file (JSON, written atomically) holds one table per measurement setting, keyed by device (CPU model and thread
count, or CUDA device name), batch and dtype; each table maps the layer keys above (which encode the shapes) to
milliseconds. `ensure(space)` measures only the entries missing for the space and saves them, so a second search on
the same device loads the table and measures nothing; a search resumed with the same file sees the same latencies,
which keeps it deterministic for a seed.

Measure on a quiet device: on a CPU shared with other work, OpenMP threads that wait for each other inflate tiny
layers by 100x and more (seen here: 0.4 ms -> 150 ms with 2 threads on 2 busy cores); `OMP_NUM_THREADS=1` is far
steadier there, and the thread count is part of the table's key.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Dict, Iterable, List, Tuple

import torch

import resnas_kernels as rk
from resnas_kernels.models.vit_resnas import Arch, SearchSpace
from resnas_kernels.models.vit_resnas.macs import token_grids
from resnas_kernels.models.vit_resnas.subnet import LN_EPS, Block, ConvStem, ResidualSpatialReduction

from .checkpoint import write_json_atomic

__all__ = ["LatencyTable", "device_key", "layer_keys", "LUT_FORMAT"]

LUT_FORMAT = "resnas-latency-lut"
LUT_VERSION = 1


def device_key(device: torch.device) -> str:
    """What the timings depend on: the device model (and thread count on the CPU)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"cpu:{cpu}:threads={torch.get_num_threads()}"


def layer_keys(arch: Arch, img_size: int, num_classes: int) -> List[str]:
    """The table entries whose sum is `arch`'s latency (slot-aligned or pruned arch)."""
    grids = token_grids(img_size, arch.num_stages)
    keys = [f"stem/c{arch.stages[0].embed}"]
    for s, st in enumerate(arch.stages):
        n = 1 + grids[s] ** 2
        if s > 0:
            keys.append(f"rsr/g{grids[s - 1]}/ci{arch.stages[s - 1].embed}/co{st.embed}")
        for b in st.blocks:
            if b is not None:
                keys += [f"attn/n{n}/c{st.embed}/h{b.heads}/d{st.head_dim}", f"mlp/n{n}/c{st.embed}/m{b.mlp}"]
    keys.append(f"head/c{arch.stages[-1].embed}/k{num_classes}")
    return keys


def _space_keys(space: SearchSpace, img_size: int, num_classes: int) -> List[str]:
    """Every entry some network of the space needs (embeds non-decreasing across stages, as RSR requires)."""
    grids = token_grids(img_size, len(space.stages))
    keys = [f"stem/c{c}" for c in space.stages[0].embed]
    for s, sp in enumerate(space.stages):
        n = 1 + grids[s] ** 2
        if s > 0:
            keys += [f"rsr/g{grids[s - 1]}/ci{ci}/co{co}" for ci in space.stages[s - 1].embed for co in sp.embed
                     if co >= ci]
        keys += [f"attn/n{n}/c{c}/h{h}/d{sp.head_dim}" for c in sp.embed for h in sp.heads]
        keys += [f"mlp/n{n}/c{c}/m{m}" for c in sp.embed for m in sp.mlp]
    keys += [f"head/c{c}/k{num_classes}" for c in space.stages[-1].embed]
    return keys


def _parse(key: str) -> Tuple[str, Dict[str, int]]:
    kind, *fields = key.split("/")
    out = {}
    for f in fields:
        name = f.rstrip("0123456789")
        out[name] = int(f[len(name):])
    return kind, out


def _layer_fn(key: str, batch: int, img_size: int, device: torch.device, dtype: torch.dtype):
    """A no-argument callable running the layer `key` once with this library's ops (random weights and inputs:
    the latency does not depend on the values)."""
    kind, f = _parse(key)
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)   # noqa: E731
    if kind == "stem":
        stem = ConvStem(f["c"]).to(device=device, dtype=dtype).eval()
        x = rand(batch, 3, img_size, img_size)
        w = stem.proj_matrix(stem.proj.weight)
        groups = rk.Ragged.uniform(batch, w.shape[1])

        def fn():
            return rk.ragged_linear(stem.patches(stem.trunk(x)), w, stem.proj.bias, groups, (f["c"],))
        return fn
    if kind in ("attn", "mlp"):
        c, n = f["c"], f["n"]
        heads, d = f.get("h", 1), f.get("d", 8)
        blk = Block(c, heads, d, f.get("m", c)).to(device=device, dtype=dtype)
        x = rand(batch, n, c)
        act = rk.Ragged.uniform(batch, c)
        if kind == "attn":
            attn = blk.attn
            hd = rk.Ragged.uniform(batch, heads * d)
            hr = rk.Ragged.uniform(batch, heads)

            def fn():
                u = rk.ragged_layer_norm(x, blk.norm1.weight, blk.norm1.bias, act, LN_EPS)
                qkv = rk.ragged_linear(u, attn.qkv.weight, attn.qkv.bias, act, hd, segments=3)
                q, kk, v = qkv.view(batch, n, 3, heads, d).unbind(2)
                a = rk.ragged_attention(q, kk, v, hr, scale=d ** -0.5)
                return rk.ragged_linear(a, attn.proj.weight, attn.proj.bias, hd, (c,), residual=x)
            return fn
        mlp = blk.mlp
        hid = rk.Ragged.uniform(batch, f["m"])

        def fn():
            u = rk.ragged_layer_norm(x, blk.norm2.weight, blk.norm2.bias, act, LN_EPS)
            h = rk.ragged_linear(u, mlp.fc1.weight, mlp.fc1.bias, act, (f["m"],), activation="gelu")
            return rk.ragged_linear(h, mlp.fc2.weight, mlp.fc2.bias, hid, (c,), residual=x)
        return fn
    if kind == "rsr":
        grid, ci, co = f["g"], f["ci"], f["co"]
        r = ResidualSpatialReduction(ci, co, (grid // 2) ** 2).to(device=device, dtype=dtype)
        x = rand(batch, 1 + grid * grid, ci)
        groups = rk.Ragged.uniform(batch, ci)

        def fn():
            return rk.residual_spatial_reduction(x, groups, (co,), r.norm.weight, r.norm.bias, r.conv.weight,
                                                 r.conv.bias, r.pos_embed, r.cls_proj.weight, r.cls_proj.bias,
                                                 grid=(grid, grid), eps=LN_EPS)
        return fn
    if kind == "head":
        c, k = f["c"], f["k"]
        norm = torch.nn.LayerNorm(c, eps=LN_EPS).to(device=device, dtype=dtype)
        head = torch.nn.Linear(c, k).to(device=device, dtype=dtype)
        x = rand(batch, 1, c)
        groups = rk.Ragged.uniform(batch, c)

        def fn():
            cls = rk.ragged_layer_norm(x, norm.weight, norm.bias, groups, LN_EPS)
            return head(cls[:, 0])
        return fn
    raise ValueError(f"unknown latency-table entry {key!r}")


def _time_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of one call in milliseconds (the median resists the load of a shared machine)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class LatencyTable:
    """Per-layer latencies (ms) for one device / batch / dtype, backed by a JSON file shared by many searches."""

    def __init__(self, path: str, device, img_size: int, num_classes: int, batch: int = 1,
                 dtype: torch.dtype = torch.float32, warmup: int = 2, repeats: int = 10):
        if batch < 1:
            raise ValueError(f"latency batch must be >= 1, got {batch}")
        if warmup < 0 or repeats < 1:
            raise ValueError(f"latency warmup must be >= 0 and repeats >= 1, got {warmup}, {repeats}")
        self.path = path
        self.device = torch.device(device)
        self.img_size, self.num_classes, self.batch, self.dtype = img_size, num_classes, batch, dtype
        self.warmup, self.repeats = warmup, repeats
        self.setting = f"{device_key(self.device)}|batch={batch}|{str(dtype).replace('torch.', '')}"
        self.measured = 0            # entries measured by this object (0 when the file had them all)
        self.doc = self._read()
        self.entries: Dict[str, float] = self.doc["tables"].setdefault(self.setting, {})

    def _read(self) -> dict:
        empty = {"format": LUT_FORMAT, "version": LUT_VERSION, "tables": {}}
        if not os.path.exists(self.path):
            return empty
        try:
            with open(self.path) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"latency table {self.path}: cannot be read as JSON ({exc}); delete it to re-measure")
        if not isinstance(doc, dict) or doc.get("format") != LUT_FORMAT or doc.get("version") != LUT_VERSION \
                or not isinstance(doc.get("tables"), dict):
            raise ValueError(f"latency table {self.path}: not a {LUT_FORMAT!r} version {LUT_VERSION} file")
        return doc

    def reload(self) -> None:
        """Re-read the file (another process, e.g. rank 0, may have filled it)."""
        self.doc = self._read()
        self.entries = self.doc["tables"].setdefault(self.setting, {})

    def ensure(self, keys: Iterable[str], progress: bool = False) -> int:
        """Measure the missing entries among `keys`, save the file if any were missing; returns how many."""
        missing = [k for k in dict.fromkeys(keys) if k not in self.entries]
        if not missing:
            return 0
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(missing), desc="latency table", unit="layer", dynamic_ncols=True)
        for k in missing:
            self.entries[k] = round(_time_ms(_layer_fn(k, self.batch, self.img_size, self.device, self.dtype),
                                             self.device, self.warmup, self.repeats), 6)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        self.measured += len(missing)
        write_json_atomic(self.path, self.doc)
        return len(missing)

    def ensure_space(self, space: SearchSpace, progress: bool = False) -> int:
        return self.ensure(_space_keys(space, self.img_size, self.num_classes), progress)

    def latency(self, arch: Arch) -> float:
        """Predicted latency of `arch`'s standalone network in milliseconds (its layers must be in the table)."""
        keys = layer_keys(arch, self.img_size, self.num_classes)
        missing = [k for k in keys if k not in self.entries]
        if missing:
            self.ensure(missing)
        return round(sum(self.entries[k] for k in keys), 6)
