"""Supernet training with multi-architectural sampling and evolutionary search (installed as
`resnas_kernels.search`).

The pipeline on the demo data (scikit-learn's bundled digits, DEMO_SPACE; a few CPU minutes):

    resnas train-supernet --out runs/sn                       # checkpoint.pt, metrics.jsonl; --resume continues
    resnas search --supernet runs/sn/checkpoint.pt --out runs/evo --generations 5 --population 50 \\
        --parents 10 --mutations 10 --crossovers 10             # history.jsonl, pareto.json/png, best.json, summary
    resnas export --arch runs/evo/best.json --supernet runs/sn/checkpoint.pt --out runs/net.pt
    python -c "from resnas_kernels.search.export import load_exported; print(load_exported('runs/net.pt'))"

Multi-process: `torchrun --standalone --nproc_per_node=2 -m resnas_kernels.cli train-supernet ...` (and `search`).
Modules: data (demo / ImageFolder data, DEMO_SPACE), train, evaluate (batched scoring, stem cache), evolution,
export, checkpoint (atomic files, validated loads).
"""
