"""`resnas search` and `resnas export` on the demo data (generated shapes): batched scoring with the cached stem equals the plain
supernet forward and one-model-per-candidate scoring; evolutionary operators respect the MAC band and dedup; the
search is deterministic and resumes after an interruption with the same history; the end-to-end run (train a few
steps, search two generations, export, reload through timm) reproduces the held-out accuracy the search selected on
and the validation accuracy it reported."""
import json
import os
import random

import pytest
import torch

from resnas_kernels.models.vit_resnas import Arch, count_macs
from resnas_kernels.models.vit_resnas.space import DEMO_SPACE
from resnas_kernels.search import evaluate, evolution, latency, networks
from resnas_kernels.search.commands import export, search, train_supernet
from resnas_kernels.search.checkpoint import CheckpointError, read_jsonl
from resnas_kernels.search.data import load_demo, load_splits, normalize
from resnas_kernels.search.shapes import NUM_CLASSES

SEARCH = ["--generations", "2", "--population", "4", "--parents", "2", "--mutations", "2", "--crossovers", "2",
          "--val-subset", "40", "--candidates-per-forward", "3", "--images-per-forward", "16", "--no-progress",
          "--seed", "5"]


def _macs(a):
    return count_macs(a, 56, NUM_CLASSES)


@pytest.fixture(scope="module")
def supernet(tmp_path_factory):
    out = tmp_path_factory.mktemp("supernet")
    assert train_supernet.main(["--out", str(out), "--train-subset", "64", "--batch-size", "16", "--epochs", "1",
                       "--width-warmup-epochs", "0", "--no-progress", "--no-eval-every-epoch", "--seed", "1"]) == 0
    return str(out / "checkpoint.pt")


@pytest.fixture(scope="module")
def searched(supernet, tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    assert search.main(["--supernet", supernet, "--out", str(out), *SEARCH]) == 0
    return out


def test_stem_cache_and_batched_forward_equal_the_supernet():
    torch.manual_seed(11)
    model = networks.build_supernet(DEMO_SPACE, 56, 10).eval()
    archs = DEMO_SPACE.sample_groups(3, rng=random.Random(7))
    x = torch.randn(5, 3, 56, 56)
    with torch.no_grad():
        ref = model(x.repeat(3, 1, 1, 1), archs, (5, 5, 5))
        got = evaluate.forward_from_stem(model, evaluate.stem_tokens(model, x).repeat(3, 1, 1), archs, (5, 5, 5))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_batched_scoring_equals_one_model_per_candidate():
    torch.manual_seed(12)
    model = networks.build_supernet(DEMO_SPACE, 56, 10).eval()
    _, val = load_demo()
    val = val.subset(24)
    archs = DEMO_SPACE.sample_groups(3, rng=random.Random(8))
    batched = evaluate.CandidateScorer(model, val, candidates_per_forward=2, images_per_forward=10).correct(archs)
    uncached = evaluate.CandidateScorer(model, val, candidates_per_forward=3, images_per_forward=24,
                                        cache_stem=False).correct(archs)
    one_by_one = evaluate.score_one_model_per_candidate(model, archs, val, images_per_forward=24)
    assert batched == uncached == one_by_one


def test_random_population_and_children_stay_in_band_and_are_new():
    lo_s, hi_s = _macs(DEMO_SPACE.min_arch()), _macs(DEMO_SPACE.max_arch())
    hi = (lo_s + hi_s) // 2
    lo = int(0.975 * hi)
    seen = set()
    pop = evolution.random_population(DEMO_SPACE, 6, random.Random(0), _macs, lo, hi, seen)
    assert len(set(pop)) == 6 and all(lo <= _macs(a) <= hi for a in pop)
    assert all(DEMO_SPACE.contains(a) for a in pop)
    again = evolution.random_population(DEMO_SPACE, 6, random.Random(0), _macs, lo, hi, set())
    assert again == pop                                       # deterministic for a seed
    before = set(seen)
    kids = evolution.make_children(DEMO_SPACE, pop[:3], 4, 4, 0.3, 0.5, random.Random(1), _macs, lo, hi, seen)
    assert kids and all(lo <= _macs(a) <= hi and a not in before for a, _ in kids)
    assert len({a for a, _ in kids}) == len(kids)
    assert {o for _, o in kids} <= {"mutation", "crossover"}


def test_pareto_front_and_macs_parsing():
    recs = [{"macs": 10, "acc": 0.5}, {"macs": 12, "acc": 0.4}, {"macs": 12, "acc": 0.7}, {"macs": 15, "acc": 0.7},
            {"macs": 9, "acc": 0.2}]
    assert [(r["macs"], r["acc"]) for r in evolution.pareto_front(recs)] == [(9, 0.2), (10, 0.5), (12, 0.7)]
    assert evolution.parse_macs("1.8G") == 1_800_000_000 and evolution.parse_macs("10.5M") == 10_500_000
    assert evolution.parse_macs("123") == 123
    with pytest.raises(ValueError, match="--macs"):
        evolution.parse_macs("fast")


def test_search_outputs(searched):
    history = read_jsonl(os.path.join(searched, "history.jsonl"))
    assert [r["index"] for r in history] == list(range(len(history)))
    assert {r["generation"] for r in history} == {0, 1}
    assert sum(r["generation"] == 0 for r in history) == 4
    archs = [Arch.from_dict(r["arch"]) for r in history]
    assert len(set(archs)) == len(archs)                      # dedup
    cfg = json.load(open(os.path.join(searched, "config.json")))
    lo, hi = cfg["band"]
    assert all(lo <= r["macs"] <= hi and r["macs"] == _macs(a) for r, a in zip(history, archs))
    best = json.load(open(os.path.join(searched, "best.json")))
    assert best["holdout_acc"] == max(r["acc"] for r in history) and best["selected_on"] == "holdout"
    assert 0 <= best["val_acc"] <= 1 and best["val_images"] == cfg["val_images"] == 800
    assert best["holdout_images"] == cfg["holdout_images"] == 40 and best["holdout_per_class"] == 50
    assert Arch.from_dict(best["pruned"]) == Arch.from_dict(best["arch"]).pruned()
    pareto = json.load(open(os.path.join(searched, "pareto.json")))
    assert pareto and max(r["holdout_acc"] for r in pareto) == best["holdout_acc"]
    assert all(0 <= r["val_acc"] <= 1 and "acc" not in r for r in pareto)
    by_index = {r["index"]: r for r in history}
    assert all(by_index[r["index"]]["acc"] == r["holdout_acc"] for r in pareto)
    assert os.path.getsize(os.path.join(searched, "pareto.png")) > 1000
    summary = open(os.path.join(searched, "summary.txt")).read()
    assert "best holdout acc" in summary and f"val acc {best['val_acc']:.4f}" in summary


def test_search_is_deterministic_and_resumes_after_interruption(supernet, searched, tmp_path, monkeypatch):
    reference = read_jsonl(os.path.join(searched, "history.jsonl"))
    # One generation, then extend to two with --resume.
    one = tmp_path / "one"
    args = ["--supernet", supernet, "--out", str(one), *SEARCH]
    args[args.index("--generations") + 1] = "1"
    assert search.main(args) == 0
    assert search.main(["--supernet", supernet, "--out", str(one), *SEARCH, "--resume"]) == 0
    assert read_jsonl(os.path.join(one, "history.jsonl")) == reference

    # Interrupted mid-generation (the second scoring chunk raises), then resumed.
    killed = tmp_path / "killed"
    real = evaluate.CandidateScorer.correct
    calls = {"n": 0}

    def flaky(self, archs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, archs)

    monkeypatch.setattr(evaluate.CandidateScorer, "correct", flaky)
    with pytest.raises(KeyboardInterrupt):
        search.main(["--supernet", supernet, "--out", str(killed), *SEARCH])
    partial = read_jsonl(os.path.join(killed, "history.jsonl"))
    assert 0 < len(partial) < len(reference)
    monkeypatch.setattr(evaluate.CandidateScorer, "correct", real)
    assert search.main(["--supernet", supernet, "--out", str(killed), *SEARCH, "--resume"]) == 0
    assert read_jsonl(os.path.join(killed, "history.jsonl")) == reference


def test_export_reloads_through_timm_with_the_recorded_accuracy(supernet, searched, tmp_path):
    net_path = str(tmp_path / "net.pt")
    assert export.main(["--arch", os.path.join(searched, "best.json"), "--supernet", supernet, "--out", net_path]) == 0
    best = json.load(open(os.path.join(searched, "best.json")))
    net = networks.load_exported(net_path)
    assert net.arch == Arch.from_dict(best["pruned"])
    assert json.load(open(str(tmp_path / "net.json")))["timm_model"] == networks.TIMM_NAME
    splits = load_splits(None, 56, best["holdout_per_class"])
    holdout = splits.holdout.subset(best["holdout_images"])
    with torch.no_grad():
        correct = (net(normalize(holdout.images)).argmax(1) == holdout.labels).sum().item()
        correct_val = (net(normalize(splits.val.images)).argmax(1) == splits.val.labels).sum().item()
    assert correct == round(best["holdout_acc"] * len(holdout))
    assert correct_val == round(best["val_acc"] * len(splits.val))


def test_search_and_export_bad_inputs(supernet, searched, tmp_path, capsys):
    base = ["--supernet", supernet, "--out", str(tmp_path / "s"), "--no-progress"]
    assert search.main(base + ["--macs", "fast"]) == 2
    assert "--macs" in capsys.readouterr().err
    assert search.main(base + ["--macs", "1G"]) == 2
    assert "outside the space" in capsys.readouterr().err
    assert search.main(base + ["--parents", "0"]) == 2
    assert "--parents" in capsys.readouterr().err
    assert search.main(["--supernet", supernet, "--out", str(searched), *SEARCH]) == 2
    assert "--resume" in capsys.readouterr().err
    assert search.main(["--supernet", supernet, "--out", str(searched), *SEARCH, "--seed", "6", "--resume"]) == 2
    assert "--seed" in capsys.readouterr().err
    assert search.main(["--supernet", os.path.join(searched, "state.pt"), "--out", str(tmp_path / "t")]) == 2
    assert "expected a 'resnas-supernet-train' checkpoint" in capsys.readouterr().err

    pruned = tmp_path / "pruned.json"                        # removed slots dropped: not a slice of the supernet
    pruned.write_text(DEMO_SPACE.min_arch().pruned().to_json())
    assert export.main(["--arch", str(pruned), "--supernet", supernet, "--out", str(tmp_path / "n.pt")]) == 2
    assert "slot-aligned" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{not json")
    assert export.main(["--arch", str(tmp_path / "junk.json"), "--supernet", supernet,
                        "--out", str(tmp_path / "n.pt")]) == 2
    assert "cannot read a JSON architecture" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="expected a 'resnas-subnet' checkpoint"):
        networks.load_exported(supernet)


def _synthetic_lut(path):
    """A table for this process's setting with made-up, width-dependent latencies for every DEMO_SPACE layer."""
    setting = latency.LatencyTable(path, "cpu", 56, NUM_CLASSES).setting
    entries = {}
    for k in latency._space_keys(DEMO_SPACE, 56, NUM_CLASSES):
        _, f = latency._parse(k)
        entries[k] = round(0.001 * f.get("c", f.get("co", 1)) * f.get("h", 1) + 1e-4 * f.get("m", 0), 6)
    with open(path, "w") as fh:
        json.dump({"format": latency.LUT_FORMAT, "version": 1, "tables": {setting: entries}}, fh)


def test_search_respects_the_latency_budget_and_reuses_the_table(supernet, tmp_path):
    lut_path = str(tmp_path / "lut.json")
    _synthetic_lut(lut_path)
    before = open(lut_path).read()
    lut = latency.LatencyTable(lut_path, "cpu", 56, NUM_CLASSES)
    macs = lambda a: count_macs(a, 56, NUM_CLASSES)   # noqa: E731
    lo_s, hi_s = macs(DEMO_SPACE.min_arch()), macs(DEMO_SPACE.max_arch())
    hi = (lo_s + hi_s) // 2
    pool = evolution.random_population(DEMO_SPACE, 20, random.Random(3), macs, int(0.975 * hi), hi, set())
    budget = sorted(lut.latency(a) for a in pool)[10]                    # about half the band is over budget
    out = tmp_path / "s"
    args = ["--supernet", supernet, "--out", str(out), "--generations", "2", "--population", "4", "--parents", "2",
            "--mutations", "2", "--crossovers", "2", "--val-subset", "16", "--candidates-per-forward", "4",
            "--images-per-forward", "16", "--no-progress", "--seed", "5", "--latency-budget", str(budget),
            "--latency-lut", lut_path]
    assert search.main(args) == 0
    history = read_jsonl(os.path.join(out, "history.jsonl"))
    assert len(history) >= 4
    for r in history:
        assert r["latency_ms"] == lut.latency(Arch.from_dict(r["arch"])) <= budget
    assert open(lut_path).read() == before                                 # reused: nothing measured
    best = json.load(open(os.path.join(out, "best.json")))
    assert best["latency_ms"] <= budget and best["latency_budget_ms"] == budget
    assert json.load(open(os.path.join(out, "pareto_latency.json")))
    assert os.path.getsize(os.path.join(out, "pareto.png")) > 1000
    assert search.main([*args[:3], str(tmp_path / "t"), *args[4:-4], "--latency-budget", "1e-9",
                           "--latency-lut", lut_path]) == 2


def test_train_subnet_fine_tunes_the_exported_net(supernet, searched, tmp_path, capsys, monkeypatch):
    best_path = os.path.join(searched, "best.json")
    net_path = str(tmp_path / "net.pt")
    assert export.main(["--arch", best_path, "--supernet", supernet, "--out", net_path]) == 0
    best = json.load(open(best_path))
    base = ["--arch", best_path, "--train-subset", "32", "--batch-size", "16", "--epochs", "1", "--no-progress",
            "--no-eval-every-epoch", "--lr", "1e-4", "--lr-warmup-epochs", "0"]
    from resnas_kernels.search.commands import train_subnet
    ft = tmp_path / "ft"
    assert train_subnet.main([*base, "--init", net_path, "--out", str(ft)]) == 0
    ckpt = torch.load(os.path.join(ft, "checkpoint.pt"), weights_only=True)
    assert ckpt["step"] == 2 and ckpt["finished"]
    assert Arch.from_dict(ckpt["subnet_arch"]) == Arch.from_dict(best["arch"])
    tuned = networks.load_exported(os.path.join(ft, "net.pt"))          # timm-loadable, the searched architecture
    assert tuned.arch == Arch.from_dict(best["pruned"])
    start = networks.load_exported(net_path).state_dict()
    moved = [k for k, v in tuned.state_dict().items() if not torch.equal(v, start[k])]
    assert moved and all(torch.isfinite(v).all() for v in tuned.state_dict().values())
    # sliced straight from the supernet: the same start as the export
    sl = tmp_path / "sliced"
    reads = []
    real_load = torch.load

    def counting_load(f, *a, **kw):
        reads.append(str(f))
        return real_load(f, *a, **kw)
    monkeypatch.setattr(torch, "load", counting_load)
    assert train_subnet.main([*base, "--init", supernet, "--out", str(sl), "--epochs", "1", "--stop-at-step", "1"]) == 0
    monkeypatch.setattr(torch, "load", real_load)
    assert reads.count(supernet) == 1, reads                           # --init is read once at start-up
    assert train_subnet.main([*base, "--init", supernet, "--out", str(sl), "--resume"]) == 0
    for k, v in networks.load_exported(os.path.join(sl, "net.pt")).state_dict().items():
        assert torch.equal(v, tuned.state_dict()[k]), k                  # resumed run == uninterrupted run
    # errors: a foreign --init, a subnet checkpoint given to the search, an arch outside the supernet's space
    assert train_subnet.main([*base, "--init", best_path, "--out", str(tmp_path / "e1")]) == 2
    assert "--init" in capsys.readouterr().err
    assert search.main(["--supernet", os.path.join(ft, "checkpoint.pt"), "--out", str(tmp_path / "e2"),
                           "--no-progress"]) == 2
    assert "train-subnet" in capsys.readouterr().err
    pruned = tmp_path / "pruned.json"
    pruned.write_text(Arch.from_dict(best["arch"]).pruned().to_json())
    if Arch.from_dict(best["arch"]).pruned() != Arch.from_dict(best["arch"]):
        assert train_subnet.main([*base[2:], "--arch", str(pruned), "--init", supernet,
                                  "--out", str(tmp_path / "e3")]) == 2
        assert "slot-aligned" in capsys.readouterr().err
