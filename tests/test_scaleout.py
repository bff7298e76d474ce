"""Shards and their merge, pictures and the gallery, wandb offline, the SLURM launcher config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import interrupt_after
from omegaconf import OmegaConf
from PIL import Image
from test_harness import cfg_for

from egg_eval.cli import CONFIG_DIR, main
from egg_eval.merge import merge
from egg_eval.runner import RunInterrupted
from egg_eval.viz import paint_map, sample_figure

STABLE = ("id", "prediction", "metrics", "localisation", "rounds", "final_views", "stop_reason")


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_shards_merge_into_the_unsharded_run(tmp_path):
    base = ["backbone=tiny", "dataset=textvqa_toy", "method.max_rounds=2"]
    full = main(cfg_for(tmp_path / "full", *base))
    full_dir = next((tmp_path / "full" / "runs").glob("*/*/*/*"))
    for i in range(3):  # 3 shards over 4 samples: one shard gets 2, two get 1
        main(cfg_for(tmp_path / "sh", *base, "shard.count=3", f"shard.index={i}"))
    run_dir = next((tmp_path / "sh" / "runs").glob("*/*/*/*"))
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("shard")) == [
        "shard-0-of-3",
        "shard-1-of-3",
        "shard-2-of-3",
    ]
    assert not (tmp_path / "sh" / "tables").exists()  # shards write no table row; the merge does
    merged = merge(run_dir, tables_dir=tmp_path / "sh" / "tables")
    a, b = _records(full_dir / "records.jsonl"), _records(run_dir / "records.jsonl")
    assert [{k: r[k] for k in STABLE} for r in a] == [{k: r[k] for k in STABLE} for r in b]
    assert (merged["score"], merged["n_samples"], merged["n_shards"]) == (full["score"], 4, 3)
    import fcntl

    with open(run_dir / "shard-1-of-3" / ".lock", "a+") as held:  # shard 1 rerun and still writing
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError, match=r"shard-1-of-3 is being written by another process"):
            merge(run_dir, tables_dir=tmp_path / "sh" / "tables")
    assert json.loads((run_dir / "submission_evalai.json").read_text()) == json.loads(
        (full_dir / "submission_evalai.json").read_text()
    )
    assert (tmp_path / "sh" / "tables" / "textvqa_toy.csv").read_text().count("\n") == 2


def test_merge_refuses_a_missing_shard_and_a_bad_index(tmp_path, capsys):
    main(cfg_for(tmp_path, "backbone=tiny", "dataset=detail_toy", "method=vanilla", "shard.count=2", "shard.index=1"))
    run_dir = next((tmp_path / "runs").glob("*/*/*/*"))
    with pytest.raises(FileNotFoundError, match=r"shards \[0\] of 2 are missing"):
        merge(run_dir)
    # from the command line: the reason in one line and exit status 2, not a traceback
    from egg_eval.merge import main as merge_main

    with pytest.raises(SystemExit) as stop:
        merge_main([str(run_dir)])
    assert stop.value.code == 2
    assert "cannot merge" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"shard\.index"):
        main(cfg_for(tmp_path, "backbone=tiny", "dataset=detail_toy", "shard.count=2", "shard.index=2"))


def test_paint_map_puts_each_cell_value_on_its_box():
    cells = np.array([[0, 0, 5, 5], [5, 0, 10, 5], [0, 5, 5, 10], [5, 5, 10, 10]], dtype=float)
    canvas = paint_map((10, 10), np.array([1.0, 2.0, 3.0, np.nan]), cells)
    assert canvas[0, 0] == 1 and canvas[0, 9] == 2 and canvas[9, 0] == 3 and canvas[9, 9] == 0


def test_a_run_draws_pictures_and_a_gallery(tmp_path):
    main(cfg_for(tmp_path, "backbone=tiny", "dataset=pope_toy", "method.max_rounds=2", "pictures=2"))
    run_dir = next((tmp_path / "runs").glob("*/*/*/*"))
    pngs = sorted((run_dir / "pictures").glob("*.png"))
    assert len(pngs) == 2 and all("/" not in p.name for p in pngs)  # POPE ids hold '/'
    page = (run_dir / "gallery.html").read_text()
    assert all(f"pictures/{p.name}" in page for p in pngs) and "prediction" in page
    rec = _records(run_dir / "records.jsonl")[0]
    fig = Image.open(pngs[0])
    n_rounds = len(rec["rounds"])
    assert fig.size[0] >= 320 * n_rounds * 0.99  # one panel per round


@pytest.mark.parametrize("f", [1, 30])
def test_sample_figure_marks_the_selected_box(f):
    """The same picture whatever the image's size (f: 100 px or 3,000 px): drawn at the panel's
    size either way. Drawn at the image's, a 4000x3000 image took 2.1 s (now 0.07 s) and its
    process peaked at 1.37 GB (now 0.69 GB, the image itself included)."""
    from egg_eval.types import Box, Region, Round, Trace

    img = Image.new("RGB", (100 * f, 100 * f), (128, 128, 128))
    cells = f * np.array([[[0, 0, 50, 50], [50, 0, 100, 50]], [[0, 50, 50, 100], [50, 50, 100, 100]]], dtype=float)
    rnd = Round([Box(0, 0, 100 * f, 100 * f)], [Region(0, Box(50 * f, 0, 100 * f, 50 * f), 1.0, 1)], [], 0.0, None)
    rnd.selected = list(rnd.regions)
    rnd.maps = [(np.array([[0.0, 1.0], [0.0, 0.0]]), cells)]
    trace = Trace((100 * f, 100 * f), [rnd], [Box(0, 0, 100 * f, 100 * f), Box(50 * f, 0, 100 * f, 50 * f)])
    fig = np.asarray(sample_figure(img, trace, panel=100))
    assert fig.shape[1] == 100 and fig.shape[0] > 100  # the panel, then the crop below it
    assert tuple(fig[25, 50]) == (230, 30, 30)  # the selected box's left edge, in red
    assert fig[25, 75, 0] > fig[75, 25, 0]  # heat on the salient cell only


def test_wandb_offline_logs_a_run_with_pictures(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = main(
        cfg_for(tmp_path, "backbone=tiny", "dataset=detail_toy", "logger=wandb", "pictures=1", "method.max_rounds=2")
    )
    assert summary["n_samples"] == 4
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_a_resumed_run_logs_into_the_same_wandb_run_with_every_record(tmp_path, monkeypatch):
    """Interrupted (Ctrl-C) and resumed, a run folder keeps its wandb run id, and the final
    samples table holds all its records, not only the resumed part's."""
    import wandb

    from egg_eval.loggers import ID_FILE

    wandb.teardown()  # wandb keeps an earlier test's WANDB_DIR for the process otherwise
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    tables = []

    class Recorded(wandb.Table):  # wandb checks isinstance(x, wandb.Table)
        def __init__(self, columns=None, data=None, **kw):
            tables.append(data)
            super().__init__(columns=columns, data=data, **kw)

    monkeypatch.setattr(wandb, "Table", Recorded)
    args = ("backbone=tiny", "dataset=detail_toy", "logger=wandb", "pictures=0", "method.max_rounds=2")
    interrupt_after(monkeypatch, 2)
    with pytest.raises(RunInterrupted, match="2 records kept"):
        main(cfg_for(tmp_path, *args))
    summary = main(cfg_for(tmp_path, *args))
    assert summary["n_samples"] == 4
    run_id = next((tmp_path / "runs").glob(f"*/*/*/*/{ID_FILE}")).read_text()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{run_id}" in r.name for r in runs)  # "-1" added when in the same second
    assert [len(t) for t in tables] == [4]  # the interrupted run logged its records, not a final table
    other = tmp_path / "other"
    main(cfg_for(other, *args, "dataset.limit=1"))  # another folder: another wandb run
    assert next((other / "runs").glob(f"*/*/*/*/{ID_FILE}")).read_text() != run_id


def test_slurm_launcher_config():
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "hydra" / "launcher" / "slurm.yaml")
    assert cfg.defaults == ["submitit_slurm"] and cfg.gpus_per_node == 1 and cfg.array_parallelism > 0
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        c = compose("eval", overrides=["hydra/launcher=slurm", "+experiment=table4_top_k"], return_hydra_config=True)
    assert c.hydra.launcher._target_.endswith("SlurmLauncher") and c.hydra.sweeper.params["method.top_k"]


def test_bench_script_prints_its_table():
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"

    def bench(methods: str, *more: str) -> str:
        cmd = [sys.executable, str(script), "--backbone", "tiny", "--n", "2", "--methods", methods, *more]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    out = bench("vanilla,egg_one_view_per_pass,egg_reused_prefix,egg_lean,egg,egg_no_map_cache")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"vanilla", "egg_one_view_per_pass", "egg", "egg_no_map_cache"} <= set(rows)
    results = json.loads(out.strip().splitlines()[-1])
    assert results["vanilla"]["backward"] == 0 and results["egg"]["backward"] >= 1
    # one batched pass per round: never more backward passes than grounding one view at a time
    assert results["egg"]["backward"] <= results["egg_one_view_per_pass"]["backward"]
    assert results["passes"]["grounding_s"] > 0 and "grounding pass" in out
    assert len(results["egg"]["times_s"]) == len(results["egg"]["paired_times_s"]) == 2
    spread = next(x for x in out.splitlines() if x.startswith("per sample, EGG / its paired plain run:"))
    assert "; egg median" in spread and "quartiles" in spread
    # every pass lean (execution.lean_activations=true); the default has no budget on CPU, so none
    lean = results["egg_lean"]
    assert lean["lean_passes"] == lean["backward"] > 0 and results["egg"]["lean_passes"] == 0
    assert lean["grounded"] == results["egg_reused_prefix"]["grounded"]
    # a speed-up undone: the map cache (every round grounds its views again, the whole image too)
    again, once = results["egg_no_map_cache"], results["egg_reused_prefix"]
    assert again["grounded"] >= once["grounded"] >= 1 and again["forward"] == once["forward"]
    assert "egg_no_map_cache: every view of a round grounded again" in out
    # all methods in one process (the GPU default): the same work per method
    one = bench(
        "vanilla,egg,egg_param_grads,egg_eager,egg_fp32",
        *("--processes", "one", "--profile", "1", "--flops", "1", "--sdpa-cudnn", "--deterministic"),
        *("--alloc-conf", "expandable_segments:True"),
    )
    shared = json.loads(one.strip().splitlines()[-1])
    # --alloc-conf: the allocator's settings of the measuring process, named in the header
    assert shared["egg"]["alloc_conf"] == "expandable_segments:True" and "alloc-conf=" in one.splitlines()[0]
    assert results["egg"]["alloc_conf"] == os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    assert "reserved_peak_mb" not in results["egg"] and "reserved by the caching allocator" not in out  # GPU only
    # cuDNN attention: off unless --sdpa-cudnn (backbone.sdpa_cudnn=true), in each method's process
    assert shared["egg"]["sdpa_cudnn"] is True and "sdpa=cudnn-allowed" in one.splitlines()[0]
    assert results["egg"]["sdpa_cudnn"] is False and results["vanilla"]["sdpa_cudnn"] is False
    # deterministic=true: off unless --deterministic, which the header names
    assert shared["egg"]["deterministic"] is True and " deterministic" in one.splitlines()[0]
    assert results["egg"]["deterministic"] is False
    # egg_fp32 is skipped on a float32 model; the others run what egg runs, another way
    assert set(shared) == {"vanilla", "egg", "egg_param_grads", "egg_eager", "passes"}
    for m in ("egg_param_grads", "egg_eager"):
        assert [shared[m][k] for k in ("forward", "backward", "grounded")] == [
            shared["egg"][k] for k in ("forward", "backward", "grounded")
        ]
    # --flops: FLOPs per sample by phase; weight gradients are FLOPs the default does not spend
    flops = {m: shared[m]["flops"] for m in ("vanilla", "egg", "egg_param_grads", "egg_eager")}
    assert "GFLOPs per sample" in one and flops["egg"]["all"] > flops["vanilla"]["all"] > 0
    assert flops["egg_param_grads"]["backward"] > 1.5 * flops["egg"]["backward"]
    assert flops["egg_param_grads"]["forward"] == flops["egg"]["forward"]
    # --flops-only: no timing, the FLOPs and passes of each method, scaled to the family's
    # depth where --layers cut the decoder
    counted = bench("vanilla,egg", "--flops-only", "--processes", "one")
    only = json.loads(counted.strip().splitlines()[-1])
    assert set(only) == {"vanilla", "egg"} and "median_s" not in only["egg"]
    assert only["egg"]["flops"]["all"] > only["vanilla"]["flops"]["all"] and only["egg"]["backward"] >= 1
    # --profile: each method's time by phase, printed as a table
    assert "backward" in shared["egg"]["phases"] and "backward" not in shared["vanilla"]["phases"]
    assert "by phase" in one and "| egg | " in one.split("by phase")[1]
    for m in ("vanilla", "egg"):
        assert (shared[m]["forward"], shared[m]["backward"]) == (results[m]["forward"], results[m]["backward"])


def test_prefetch_bench_times_each_depth_on_document_pages():
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_prefetch.py"
    cmd = [sys.executable, str(script), "--n", "3", "--size", "400x300", "--repeats", "1", "--depths", "0,2"]
    out = subprocess.run([*cmd, "--methods", "vanilla"], capture_output=True, text=True, check=True).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| vanilla")]
    assert [r[1].strip() for r in rows] == ["0", "2"]
    for r in rows:  # the loop's time per sample holds the model's, and the reading and decoding besides
        loop, model = (float(c.strip().removesuffix(" ms")) for c in r[2:4])
        assert loop >= model > 0


def test_bench_bounds_the_views_tokens_as_the_family_settings_do():
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
    base = [sys.executable, str(script), "--backbone", "tiny", "--family", "internvl35", "--n", "1"]
    base += ["--methods", "egg", "--processes", "one", "--image-size", "640"]
    prefix = {}
    for tiles in (None, 1):
        extra = [] if tiles is None else ["--max-tiles", str(tiles)]
        out = subprocess.run(base + extra, capture_output=True, text=True, check=True).stdout
        prefix[tiles] = json.loads(out.strip().splitlines()[-1])["egg"]["prefix_tokens"]
    # the whole image's tokens, which the answer takes from the grounding cache: 1 tile, no thumbnail
    assert prefix[1] < prefix[None]
    wrong = subprocess.run([*base, "--max-pixels", "10000"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "--max-pixels applies to --family qwen25vl only" in wrong.stderr


def test_merge_refuses_shards_run_with_other_settings(tmp_path):
    base = ["backbone=tiny", "dataset=detail_toy", "method=vanilla", "shard.count=2"]
    main(cfg_for(tmp_path, *base, "shard.index=0"))
    main(cfg_for(tmp_path, *base, "shard.index=1", "backbone.max_new_tokens=3"))
    run_dir = next((tmp_path / "runs").glob("*/*/*/*"))
    with pytest.raises(ValueError, match=r"shard 1 .*backbone\.max_new_tokens: 8 -> 3"):
        merge(run_dir)
    assert not (run_dir / "records.jsonl").exists()


def test_a_sweep_runs_through_the_submitit_launcher(tmp_path):
    """The job-array path end to end, with submitit's local executor standing in for SLURM
    (same plugin, same pickled task function and config): each run of a sweep is a submitit
    job, and each writes its own run folder."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "egg_eval", "-m", "backbone=tiny", "dataset=detail_toy", "method.top_k=1,2"]
    cmd += ["hydra/launcher=submitit_local", "progress=false", "pictures=0", f"output_root={tmp_path / 'out'}"]
    cmd += [f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    summaries = sorted((tmp_path / "out" / "runs").glob("*/*/*/*/summary.json"))
    assert [p.parent.name.split("_")[2] for p in summaries] == ["k1", "k2"]
    assert all(json.loads(p.read_text())["n_samples"] == 4 for p in summaries)
    assert len(list((tmp_path / "sweep" / ".submitit").rglob("*_result.pkl"))) == 2  # submitit ran both jobs


def test_gpu_check_dry_runs_on_the_tiny_models():
    """scripts/gpu_check.py is what a GPU lease runs first; its CPU dry run on the tiny models
    keeps it working between leases, with the exact-by-construction gaps checked."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
    cmd = [sys.executable, str(script), "--backbone", "tiny", "--device", "cpu", "--dtype", "float32"]
    ok = subprocess.run(
        [*cmd, "--tolerance", "1e-4", "--deterministic", "--whole-runs", "2"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("  OK") == 4 and "answer on the grounding cache" in ok.stdout
    same = "deterministic=True: max |diff| / max = 0.00e+00, batched views: 0.00e+00"
    assert ok.stdout.count(same) == 4, ok.stdout
    whole = "answers differ on 0, crops on 0, maps max |diff| / max = 0.00e+00"
    assert ok.stdout.count("whole EGG runs twice on 2 samples, deterministic=True: " + whole) == 4, ok.stdout
    assert ok.stdout.count("whole EGG runs twice on 2 samples, deterministic=False: " + whole) == 4  # a CPU is
    assert ok.stdout.count("  lean: map max |diff| / max = 0.00e+00") == 4  # the same ops again: bit-equal
    # the check bites: under a tolerance no gap can meet, the family fails and the exit status counts it
    strict = subprocess.run([*cmd, "--families", "llava16", "--tolerance", "-1"], capture_output=True, text=True)
    assert strict.returncode == 1 and "above --tolerance -1.0" in strict.stderr and "FAILED" in strict.stdout


def test_oom_check_dry_runs_on_the_tiny_models():
    """scripts/oom_check.py makes CUDA run out of memory for real on a GPU lease; on CPU there
    is no cap to set, and its dry run keeps the rest working between leases: every run
    uncapped succeeds, the recomputed runs agree with the ones as they are, and the runner's
    records match the direct runs."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "oom_check.py"
    cmd = [sys.executable, str(script), "--backbone", "tiny", "--device", "cpu", "--dtype", "float32"]
    ok = subprocess.run([*cmd, "--families", "qwen25vl"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "crops and answer as uncapped: True" in ok.stdout and "  OK" in ok.stdout
    assert "small 'ok', large 'ok', small again 'ok'; 0 failure(s)" in ok.stdout


def test_gpu_check_compares_answers_by_their_token_ids(monkeypatch):
    """A real-size random model generates ids the offline tokenizer does not know, which
    decode to '': gpu_check and oom_check compare the answers' ids instead, and put the
    tokenizer back after."""
    import argparse

    from egg_eval.data.detail import rows
    from egg_eval.grounding.refine import EggConfig, run_egg

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    from bench import load
    from gpu_check import answers_as_ids

    bb = load(argparse.Namespace(backbone="tiny", family="llava15", layers=None, device="cpu", dtype="float32"))
    tok = bb.processor.tokenizer
    row = next(rows(1, seed=5))
    text, _ = run_egg(bb, row["image"], row["question"], EggConfig())
    with answers_as_ids(bb):
        ids, _ = run_egg(bb, row["image"], row["question"], EggConfig())
    assert ids and all(w.isdigit() for w in ids.split())
    assert tok.decode([int(w) for w in ids.split()], skip_special_tokens=True).strip() == text
    assert "decode" not in vars(tok)  # the class's own again


def test_gpu_check_whole_runs_see_maps_that_differ_between_runs(monkeypatch):
    """``gpu_check --whole-runs`` compares two whole EGG runs: gradients that drift from one
    pass to the next (as atomics in a GPU backward can) show as a map gap, and a drift large
    enough to move a crop as crops that differ; the same passes again show nothing."""
    import argparse

    import torch

    from egg_eval.grounding import saliency

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    from bench import load
    from gpu_check import repeat_runs

    bb = load(argparse.Namespace(backbone="tiny", family="qwen25vl", layers=None, device="cpu", dtype="float32"))
    assert repeat_runs(bb, 2, False) == (0, 0, 0.0)
    calls, exact = [0], saliency._gradients

    def drifting(scale):
        def gradients(value, leaves):
            calls[0] += 1
            return tuple(g * (1 + scale * calls[0]) for g in exact(value, leaves))

        return gradients

    monkeypatch.setattr(saliency, "_gradients", drifting(1e-3))  # a uniform scale: same crops, other values
    answers, paths, gap = repeat_runs(bb, 2, False)
    assert (answers, paths) == (0, 0) and 1e-4 < gap < 1e-1
    rng = np.random.default_rng(0)

    def noisy(value, leaves):  # per token: moves the elbow and the components
        return tuple(g * torch.from_numpy(rng.random((*g.shape[:-1], 1))).to(g.dtype) for g in exact(value, leaves))

    monkeypatch.setattr(saliency, "_gradients", noisy)
    assert repeat_runs(bb, 2, False)[1] > 0


def test_flops_cut_to_a_few_layers_are_scaled_to_the_familys_depth():
    """``--flops-only --layers l`` at real widths: the grounding passes' and the answer's FLOPs
    are the decoder's, so they scale by depth / l; the tower's and the projector's do not."""
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("bench", Path(__file__).parent.parent / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = SimpleNamespace(backbone="real", family="llava15", layers=2, flops=1, n=1, image_size=None, repeats=1)
    args.__dict__.update(device="cpu", dtype="float32", stock_windows=False, max_tiles=None, max_pixels=None)
    passes = {"forward": 1, "backward": 0, "grounded": 0, "tower": 1, "rounds": 0}
    results = {
        "vanilla": {**passes, "flops": {"tower": 10e9, "answer": 4e9, "all": 14e9}},
        "egg": {**passes, "flops": {"tower": 20e9, "other": 1e9, "forward": 2e9, "backward": 3e9, "answer": 5e9}},
    }
    results["egg"]["flops"]["all"] = 31e9
    text = bench.flops_only_report(args, results)
    vanilla_32 = 10 + 4 * 16  # 74 GFLOPs at 32 layers
    egg_32 = 20 + 1 + (2 + 3 + 5) * 16  # 181
    assert f"| vanilla | 0.0 | 1.0 | 0.0 | 0.0 | 1.0 | 14.0 | 1.00 | {vanilla_32} | 1.00 |" in text
    assert f"| egg | 0.0 | 1.0 | 0.0 | 0.0 | 1.0 | 31.0 | 2.21 | {egg_32} | {egg_32 / vanilla_32:.2f} |" in text


def test_bench_gives_the_spread_of_per_sample_ratios():
    """The paired ratio's quartiles over samples (a median of ratios), so that a ratio near a
    target can be told apart from the spread; fewer than 2 samples give none."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", Path(__file__).parent.parent / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    spread = bench.ratio_spread({"times_s": [2.0, 12.0, 6.0, 4.0, 2.5], "paired_times_s": [1.0, 2.0, 1.0, 1.0, 0.5]})
    assert spread == pytest.approx((4.0, 5.0, 6.0))  # ratios 2, 6, 6, 4, 5
    assert bench.ratio_spread({"times_s": [3.0], "paired_times_s": [1.0]}) is None
