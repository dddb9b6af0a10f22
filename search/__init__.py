"""Supernet training with multi-architectural sampling and evolutionary search (installed as
`resnas_kernels.search`).

The pipeline on the demo data (scikit-learn's bundled digits, DEMO_SPACE; a few CPU minutes):

    resnas train-supernet --out runs/sn                       # checkpoint.pt, metrics.jsonl; --resume continues
    resnas search --supernet runs/sn/checkpoint.pt --out runs/evo --generations 5 --population 50 \\
        --parents 10 --mutations 10 --crossovers 10             # history.jsonl, pareto.json/png, best.json, summary
    resnas export --arch runs/evo/best.json --supernet runs/sn/checkpoint.pt --out runs/net.pt
    python -c "from resnas_kernels.search.export import load_exported; print(load_exported('runs/net.pt'))"
    resnas train-subnet --arch runs/evo/best.json --init runs/net.pt --out runs/ft   # fine-tune -> runs/ft/net.pt

Optional: `resnas search ... --latency-budget 5` (ms, predicted from a per-layer latency table measured on this
device, cached in --latency-lut); training augmentation `--aa`, `--hflip`, `--reprob`, `--mixup`, `--cutmix`
(recipe defaults with --data, off on the demo digits).

Multi-process: `torchrun --standalone --nproc_per_node=2 -m resnas_kernels.cli train-supernet ...` (and `search`).
Modules: data (demo / ImageFolder data, DEMO_SPACE), augment (timm RandAugment / erasing / Mixup, seeded per
step), train (also train-subnet mode; DDP under torchrun), finetune (`resnas train-subnet`), evaluate (batched
scoring, stem cache), latency (latency lookup table), evolution, export, checkpoint (atomic files, validated loads).
"""
