"""Supernet training with multi-architectural sampling and evolutionary search (installed as
`resnas_kernels.search`).

The pipeline on the demo data (the generated shapes task of `shapes`, DEMO_SPACE; a few CPU minutes), all of it in
one command with `resnas demo --out runs/demo` (commands/demo.py: report.md with the plots), or step by step:

    resnas train-supernet --out runs/sn                       # checkpoint.pt, metrics.jsonl; --resume continues
    resnas search --supernet runs/sn/checkpoint.pt --out runs/evo   # demo-sized defaults for a demo supernet;
                                                              # history.jsonl, pareto.json/png, best.json, summary
    resnas export --arch runs/evo/best.json --supernet runs/sn/checkpoint.pt --out runs/net.pt
    python -c "from resnas_kernels.search.networks import load_exported; print(load_exported('runs/net.pt'))"
    resnas train-subnet --arch runs/evo/best.json --init runs/net.pt --out runs/ft   # fine-tune -> runs/ft/net.pt

Optional: `resnas search ... --latency-budget 5` (ms, predicted from a per-layer latency table measured on this
device, cached in --latency-lut); training augmentation `--aa`, `--hflip`, `--reprob`, `--mixup`, `--cutmix`
(recipe defaults with --data, off on the demo data).

The supernet never trains on the held-out split (`--holdout-per-class` images of each class carved from the training
set, data.load_splits); the search selects on it, and validation only reports the networks the search returns.

Multi-process: `torchrun --standalone --nproc_per_node=2 -m resnas_kernels.cli train-supernet ...` (and `search`).
Library modules (they never import `commands`): data (demo / ImageFolder data, the three splits, batch indices and
groups), shapes (the generated demo task), augment (timm RandAugment / erasing / Mixup, seeded per step), networks
(supernets built and loaded from checkpoints, the export format), evaluate (the one sub-network evaluator: batched
scoring, stem cache), distributed (the torchrun process group), trainer (supernet and one-architecture training),
evolution (the search), latency (latency lookup table), checkpoint (atomic files, validated loads). The search spaces
are in models/vit_resnas/space.py. `commands` holds the front ends of `resnas train-supernet`, `train-subnet`,
`search`, `export` and `demo`: argument parsing and exit codes.
"""
