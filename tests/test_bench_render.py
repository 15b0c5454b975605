"""bench/render.py: README benchmark tables from result dicts (synthetic fixtures; no benchmark runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.render import END, START, load_results, main, render_section, replace_section

MACHINE = {"platform": "Linux", "processor": "x86_64", "cpu_count": 2, "torch_threads": 2, "cuda": None,
           "versions": {"torch": "2.14.1", "diffusers": "0.42.1", "timm": "1.0.31"}}


def study(domain: str) -> dict:
    rows = [
        {"arch": "efficientnet_lite0", "train_data": "real", "accuracy": 0.91, "accuracy_ci95": [0.90, 0.92],
         "balanced_accuracy": 0.905, "macro_f1": 0.90, "n_train": 933},
        {"arch": "efficientnet_lite0", "train_data": "synthetic", "accuracy": 0.637, "accuracy_ci95": [0.62, 0.65],
         "balanced_accuracy": 0.63, "macro_f1": 0.61, "n_train": 256},
        {"arch": "efficientnet_lite0", "train_data": "mixed", "accuracy": 0.92, "accuracy_ci95": [0.91, 0.93],
         "balanced_accuracy": 0.918, "macro_f1": 0.917, "n_train": 1189},
    ]
    return {
        "benchmark": f"study-{domain}", "date": "2026-11-25", "machine": MACHINE, "domain": domain, "scale": "small",
        "results": rows, "ratios": {"efficientnet_lite0": {"synthetic/real": 0.7, "mixed/real": 1.011}},
        "generator": {"preset": "cpu-small", "steps": 240, "minutes": 6.0, "step_budget": None},
        "synthetic_per_class": 64, "guidance": 2.0, "sampler": "dpmsolver++", "sampling_steps": 20,
        "classifier_input": 96, "epochs": 8, "seed": 0, "minutes_total": 15.2,
        "audit": {"passed": True, "summary": "passed: 1.2% flagged",
                  "details": {"gate": {"flagged_share": 0.012, "expected_share": 0.02, "max_flagged_share": 0.01,
                                       "passed": True}}},
    }


def fixtures() -> dict[str, dict]:
    return {
        "study-brain-mri": study("brain-mri"),
        "class-fidelity-brain-mri": {
            "date": "2026-11-25", "machine": MACHINE, "domain": "brain-mri", "class_fidelity": 0.734,
            "class_fidelity_ci95": [0.69, 0.78], "per_class_fidelity": {"glioma": 0.8, "notumor": 0.6},
            "judge_accuracy_on_real_test": 0.9, "generator": {"preset": "cpu-small", "steps": 120, "minutes": 4},
            "sampling": {"per_class": 32},
        },
        "sampling": {
            "date": "2026-11-25", "machine": MACHINE, "domain": "brain-mri", "data": "real", "scale": "small",
            "threads": 1, "seed": 0, "resolution": 32, "speedup": 48.7,
            "generator": {"preset": "tiny", "parameters": 687089, "steps": 300},
            "budget": {"images": 64, "batch_size": 64, "classifier_epochs": 15, "classifier_input": 96,
                       "classifier_seeds": 2},
            "ours": {"steps": 20, "guidance": 2.0, "images_per_second": 3.21,
                     "tstr": {"accuracy": 0.512, "accuracy_ci95": [0.5, 0.52], "balanced_accuracy": 0.51,
                              "per_seed": [{"seed": 0, "accuracy": 0.5}, {"seed": 1, "accuracy": 0.524}],
                              "n_train": 64, "n_test": 3691, "arch": "efficientnet_lite0"}},
            "ddpm": {"steps": 1000, "guidance": 2.0, "images_per_second": 0.0659,
                     "tstr": {"accuracy": 0.523, "accuracy_ci95": [0.51, 0.53], "balanced_accuracy": 0.52,
                              "n_train": 64}},
            "real_reference": {"accuracy": 0.7, "accuracy_ci95": [0.69, 0.71], "n_train": 64},
            "tstr_difference_points": -1.1, "tstr_difference_ci95_points": [-2.0, -0.2],
            "targets": [{"target": "speed-up >= 25x", "measured": "48.7x", "met": True},
                        {"target": "TSTR within 2 points", "measured": "-1.1 points", "met": True}],
        },
        "explain": {
            "date": "2026-11-25", "machine": MACHINE,
            "settings": {"num_samples": 1000, "images": 6, "repeats": 1, "resolution": 64, "ours": "explain_image",
                         "classifier": {"arch": "efficientnet_lite0", "input_size": 96, "held_out_accuracy": 0.69}},
            "summary": {"ours": {"median_seconds": 1.9, "median_model_seconds": 1.8},
                        "lime_docs": {"median_seconds": 4.3, "median_model_seconds": 4.1},
                        "speedup_vs_lime_docs": 2.26, "mean_iou_pixels_vs_lime_docs": 0.18},
        },
        "train-speed": {
            "date": "2026-11-25", "machine": MACHINE, "scale": "small", "threads": 2,
            "unet": {"preset": "cpu-small", "parameters": 2735585, "resolution": 32},
            "budget": {"batch_size": 64, "warmup_steps": 3, "timed_steps": 8, "repeats": 3},
            "training": {"ours": {"images_per_second": 27.5, "runs": [27.0, 27.5, 28.0]},
                         "minimal": {"images_per_second": 29.5, "runs": [29.0, 29.5, 30.0]},
                         "ratio_ours_to_minimal": 0.932, "ours_gflops": 20.1, "minimal_gflops": 21.6},
            "forward": {"gflop_per_image": 0.25, "levers": [
                {"name": "baseline", "batch": 64, "threads": 2, "images_per_second": 120.0, "gflops": 30.0,
                 "percent_of_peak": 10.2, "percent_of_used_cores_peak": 10.2, "dtype": "float32"},
                {"name": "torch.compile", "batch": 64, "threads": 2, "images_per_second": 140.0, "gflops": 35.0,
                 "percent_of_peak": 11.9, "percent_of_used_cores_peak": 11.9, "dtype": "float32",
                 "compile_seconds": 95.0},
                {"name": "bf16 autocast", "batch": 64, "threads": 2, "error": "RuntimeError: nope"},
            ]},
            "peak": {"model": "Intel(R) Xeon(R) Processor", "cores": 2, "mhz": 2300.0, "mhz_source": "cpuinfo",
                     "flop_per_cycle_per_core": 64, "gflops_fp32": 294.4, "assumption": "2 FMA units assumed"},
            "sgemm_reference": {"1 thread(s)": 113.0, "2 thread(s)": 220.5},
            "targets": [{"target": "UNet forward >= 30% of fp32 peak", "measured": "11.9%", "met": False}],
        },
        "runner-small": {"date": "2026-11-25", "machine": MACHINE, "scale": "small", "minutes_total": 84.0,
                         "limit_minutes": 90.0, "benchmarks": [
                             {"name": "sampling", "ok": True, "minutes": 13.2, "expected_minutes": 14},
                             {"name": "explain", "ok": False, "minutes": 0.1, "expected_minutes": 4}]},
    }


def test_section_has_markers_and_expected_rows():
    out = render_section(fixtures())
    assert out.startswith(START) and out.endswith(END)
    assert out.count(START) == 1 and out.count(END) == 1
    # study: one row per arch x train data, the ratio on the TSTR and mixed rows, and the audit gate
    assert "| brain-mri | efficientnet_lite0 | real (TRTR) | 0.910 [0.900, 0.920] | 0.905 | 0.900 | — | 933 |" in out
    assert "| brain-mri | efficientnet_lite0 | synthetic (TSTR) | 0.637 [0.620, 0.650] | 0.630 | 0.610 | 0.70 |" in out
    assert "| brain-mri | efficientnet_lite0 | mixed | 0.920 [0.910, 0.930] | 0.918 | 0.917 | 1.01 |" in out
    assert "| brain-mri | 1.2% | 2.0% | 1.0% | ✅ | passed: 1.2% flagged |" in out
    # class fidelity
    assert "| brain-mri | 0.734 [0.690, 0.780] | glioma 0.80, notumor 0.60 | 0.900 |" in out
    # sampling: both arms, the speed-up and the targets with marks
    assert "| ours: dpmsolver++ | 20 | 2.0 | 3.210 | 48.7× | 0.512 [0.500, 0.520] | 0.500, 0.524 | 0.510 | 64 |" in out
    assert "| stock DDPM (diffusers DDPMScheduler) | 1000 | 2.0 | 0.066 | 1.0× | 0.523 [0.510, 0.530] |" in out
    assert "TSTR difference ours − DDPM: -1.1 points [-2.0, -0.2]" in out
    assert "- ✅ target: speed-up >= 25x — measured 48.7x" in out
    # LIME, read from the explain keys
    assert "| `lime_docs` | 4.30 | 4.10 | 2.26× | pixels 0.18 |" in out
    # train speed: loops, levers (a failed lever is shown as such), peak, target
    assert "| ours: `train_generator` | 27.5 | 27.0, 27.5, 28.0 | 20.1 |" in out
    assert "Ours ÷ minimal: 0.93×" in out
    assert "| torch.compile | 64 | 2 | 140.0 | 35.0 | 11.9% | 11.9% | compile 95 s |" in out
    assert "| bf16 autocast | 64 | 2 | failed |" in out
    assert "fp32 peak 294 GFLOP/s" in out
    assert "113.0 GFLOP/s on 1 thread(s), 220.5 GFLOP/s on 2 thread(s)" in out
    assert "beats the computed one-core peak" not in out  # 113 < 294 / 2
    assert "ceiling of cores × one thread's matmul rate (226 GFLOP/s)" in out and "is 15%." in out
    hot = fixtures()["train-speed"] | {"sgemm_reference": {"1 thread(s)": 176.0}}
    assert "beats the computed one-core peak (147)" in render_section({"train-speed": hot})
    assert "Native bf16 for" not in out  # a run that did not ask the library says nothing about it
    peak = fixtures()["train-speed"]["peak"]
    no_bf16 = fixtures()["train-speed"] | {"peak": peak | {"bf16_native_for_recipe": False, "bf16_instructions": []}}
    assert ("bf16 generator, as the library judged it in this run: no (the recipe trains in float32 here); "
            "bf16 instructions listed by the CPU: none.") in render_section({"train-speed": no_bf16})
    assert "- ❌ target: UNet forward >= 30% of fp32 peak — measured 11.9%" in out
    # targets at a glance and the runner's timing
    assert "| train-speed | UNet forward >= 30% of fp32 peak | 11.9% | ❌ |" in out
    assert "| sampling | ✅ | 13.2 | 14 |" in out and "| explain | ❌ | 0.1 | 4 |" in out
    assert "✅ total 84.0 min (limit 90 min)" in out
    # every table says when and where it was measured
    assert out.count("_Measured 2026-11-25 on") >= 5


def test_missing_results_say_not_run_yet():
    out = render_section({})
    assert out.startswith(START) and out.endswith(END)
    for command in ("python bench/study.py --domain brain-mri", "python bench/study.py --domain covid-ct",
                    "python bench/class_fidelity.py --domain phantom-brain-mri", "python bench/sampling.py",
                    "python bench/explain.py", "python bench/train_speed.py"):
        assert f"_not run yet_ (`{command}`)" in out.replace("_Not run yet_", "_not run yet_")
    assert "Targets at a glance" not in out
    recipe = study("all") | {"recipe": "cpu-study", "overrides": {"generator_steps": 700},
                             "classifier": {"epochs": 6, "val_fraction": 0.0, "ema_decay": 0.998}}
    assert ("Recipe `cpu-study` with {'generator_steps': 700}." in render_section({"study-all": recipe})
            and "96 px, the last epoch with weight EMA 0.998;" in render_section({"study-all": recipe}))
    # the generator's own minutes (the budget is per generator), read from the run's seconds
    timed = recipe | {"generator": {"preset": "cpu-study", "steps": 1200, "step_budget": 1200, "seconds": 1263.0}}
    assert "(1200 steps trained in 21.1 min)" in render_section({"study-all": timed})
    # a step budget with a wall-clock cap: which one stopped the run, and in what precision it trained
    capped = recipe | {"generator": {"preset": "cpu-study", "steps": 2150, "step_budget": 2700, "minutes": 29.0,
                                     "seconds": 1741.0, "mixed_precision": "no"}}
    assert ("Generator cpu-study 2700 steps or 29 min, whichever first (2150 steps trained in 29.0 min, float32, "
            "stopped by the wall-clock cap)") in render_section({"study-all": capped})
    full = capped | {"generator": capped["generator"] | {"steps": 2700, "mixed_precision": "bf16",
                                                         "stopped_by": "steps"}}
    assert "(2700 steps trained in 29.0 min, bf16 autocast)" in render_section({"study-all": full})
    gpu = full | {"generator": full["generator"] | {"mixed_precision": "fp16"}}
    assert "(2700 steps trained in 29.0 min, fp16 autocast)" in render_section({"study-all": gpu})
    held_out = recipe | {"classifier": {"val_fraction": 0.1, "ema_decay": None}}
    assert "96 px, the best epoch on a 10% val split;" in render_section({"study-all": held_out})
    partial = render_section({"study-all": study("all")})
    assert "| all | efficientnet_lite0 | real (TRTR)" in partial
    assert "brain-mri: _not run yet_" in partial


def test_odd_and_incomplete_payloads_do_not_crash():
    odd = {"sampling": {"date": "x"}, "train-speed": {}, "explain": {"some": {"figure": 1.5}, "flag": True},
           "study-brain-mri": {"results": [{"arch": "resnet18", "train_data": "real", "accuracy": None}]},
           "class-fidelity-x": {}}
    out = render_section(odd)
    assert "| some.figure | 1.5 |" in out
    assert "| brain-mri | resnet18 | real (TRTR) | — |" in out


def test_replace_between_markers_is_idempotent():
    readme = "# Title\n\nIntro.\n\n## Benchmarks\n\n" + START + "\nold stuff\n" + END + "\n\n## After\n\nkept\n"
    section = render_section(fixtures())
    once = replace_section(readme, section)
    assert "old stuff" not in once
    assert once.startswith("# Title\n\nIntro.\n\n## Benchmarks\n\n" + START)
    assert once.endswith(END + "\n\n## After\n\nkept\n")
    assert replace_section(once, section) == once
    assert once.count(START) == 1


def test_missing_markers_append_a_benchmarks_section():
    readme = "# Title\n\nNo markers here.\n"
    section = render_section({})
    once = replace_section(readme, section)
    assert once.startswith(readme.rstrip("\n"))
    assert once.endswith("## Benchmarks\n\n" + section + "\n")
    assert replace_section(once, section) == once


def test_main_writes_readme_from_result_files(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for name, payload in fixtures().items():
        (results / f"{name}.json").write_text(json.dumps(payload))
    (results / "broken.json").write_text("{not json")
    readme = tmp_path / "README.md"
    readme.write_text("# X\n")
    assert set(load_results(results)) == set(fixtures())
    assert main(["--results", str(results), "--readme", str(readme), "--check"]) == 1
    assert main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# X\n\n## Benchmarks\n\n" + START) and "48.7×" in text
    assert main(["--results", str(results), "--readme", str(readme), "--check"]) == 0
    assert main(["--results", str(results), "--readme", str(readme)]) == 0
    assert readme.read_text() == text


def test_runner_plan_fits_the_small_budget():
    from bench.__main__ import BENCH, BENCHMARKS, SMALL_LIMIT_MINUTES, select

    small = select(BENCHMARKS, None, "small")
    assert sum(b.expected_minutes["small"] for b in small) < SMALL_LIMIT_MINUTES
    assert "levers-brain-mri" not in [b.name for b in small]  # full scale only, or by name
    assert "levers-brain-mri" in [b.name for b in select(BENCHMARKS, None, "full")]
    assert [b.name for b in select(BENCHMARKS, ["levers"])] == ["levers-brain-mri"]
    assert [b.name for b in select(BENCHMARKS, ["study"])] == ["study-brain-mri", "study-all", "study-covid-ct"]
    assert [b.name for b in select(BENCHMARKS, ["sampling", "train-speed"])] == ["sampling", "train-speed"]
    for b in BENCHMARKS:
        assert b.optional or (BENCH / b.script).exists(), b.script
    with pytest.raises(SystemExit):
        select(BENCHMARKS, ["nope"])


def test_runner_study_commands_parse_with_the_study_script():
    from bench.__main__ import BENCHMARKS
    from bench.study import parser

    studies = [b for b in BENCHMARKS if b.script == "study.py"]
    assert len(studies) == 3
    for b in studies:
        for scale in ("small", "full"):
            a = parser().parse_args(b.args[scale])  # exits (SystemExit) on a flag the script lost
            assert a.domain == b.name.removeprefix("study-") and a.recipe == "cpu-study"
        assert parser().parse_args(b.args["full"]).steps is None  # the full scale is the recipe's budget


def test_runner_reports_failures_and_requires_a_fresh_result(tmp_path, monkeypatch):
    import bench.__main__ as runner

    (tmp_path / "results").mkdir()
    (tmp_path / "good.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('results').joinpath('good.json').write_text('{}')\n")
    (tmp_path / "silent.py").write_text("pass\n")
    (tmp_path / "bad.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setattr(runner, "BENCH", tmp_path)
    plan = [runner.Benchmark(n, f"{n}.py", {"small": []}, {"small": 1}) for n in ("good", "silent", "bad")]
    plan.append(runner.Benchmark("absent", "absent.py", {"small": []}, {"small": 1}, optional=True))
    records = {r["name"]: r for r in (runner.run_one(b, "small", None) for b in plan)}
    assert records["good"]["ok"] is True and records["good"]["status"] == "ok"
    assert records["silent"]["ok"] is False and "no new result JSON" in records["silent"]["status"]
    assert records["bad"]["ok"] is False and records["bad"]["status"] == "exit 3"
    assert records["absent"]["ok"] is None and records["absent"]["status"].startswith("skipped")
    assert "total" in runner.summary(list(records.values()), 0.5, 90.0)


def science_row(lever: str, value, steps: int, tstr: float, mixed: float | None = None) -> dict:
    return {"lever": lever, "value": value, "variant": "base", "step": steps, "ema": None, "generator_steps": steps,
            "sampling": {"sampler": "dpmsolver++", "steps": 20, "guidance": 2.0, "per_class": 128},
            "recipe": {"epochs": 6, "augmentation_strength": 1.0, "mixup": 0.0, "cutmix": 0.0},
            "class_fidelity": 0.8, "coverage": 0.31, "recall": 0.4, "fd": 12.5, "ms_ssim": 0.35,
            "real_ms_ssim": 0.22, "gate_passed": True,
            "per_class": {"a": {"coverage": 0.1}, "b": {"coverage": 0.52}},
            "tstr": {"accuracy": tstr, "accuracy_ci95": [tstr - 0.01, tstr + 0.01]},
            "trtr": {"accuracy": 0.88}, "tstr_over_trtr": tstr / 0.88,
            "mixed_over_trtr": mixed}


def test_science_rows_show_diversity_ratios_and_gate_for_every_row():
    curve = {"benchmark": "science-curve-brain-mri", "date": "2026-12-02", "machine": MACHINE, "domain": "brain-mri",
             "plan": "curve", "seed": 0,
             "generator_runs": {"base": {"steps": 1200, "seconds_per_step": 1.25, "torch_threads": 2,
                                         "lr_schedule": "constant_with_warmup", "resolution": 32}},
             "rows": [science_row("generator steps", 300, 300, 0.5),
                      science_row("generator steps", 1200, 1200, 0.7, 1.01)]}
    out = render_section({"science-curve-brain-mri": curve})
    assert ("**brain-mri — curve** (base: 1200 steps, 1.25 s/step at 2 thread(s) (constant_with_warmup, 32 px); "
            "classes in per-class columns: a / b)") in out
    assert ("| generator steps | 1200 | base @ 1200 | dpmsolver++, w=2, 20 steps, 128/class | 6 ep, aug 1.0 | 0.80 | "
            "0.31 | 0.10 / 0.52 | 0.40 |") in out
    # rows scored before per-class recall was recorded say so with a dash
    assert "| 0.35 (0.22) | 0.700 [0.690, 0.710] | — | 0.880 | 0.80× | 1.01× | ✅ |" in out
    assert "science-curves.png" in out
    target = "| science-curve-brain-mri | TSTR accuracy >= 0.90 x TRTR (Lite0, cpu-study) |"
    # rows recorded before the classifier keys existed picked their epoch on a val split
    assert f"{target} 0.80 at 1200 steps, dpmsolver++, 128/class, val-picked epoch | ❌ |" in out
    target = "| science-curve-brain-mri | mixed accuracy >= TRTR, audit gate passed |"
    assert f"{target} 1.010; audit gate passed | ✅ |" in out
    recipe = science_row("recipe", "cpu-study", 1200, 0.81, 1.02)
    recipe["recipe"] |= {"val_fraction": 0.0, "ema_decay": 0.998}
    out = render_section({"science-recipe-all": {**curve, "rows": [recipe]}})
    assert ("| science-recipe-all | TSTR accuracy >= 0.90 x TRTR (Lite0, cpu-study) | 0.92 at 1200 steps, "
            "dpmsolver++, 128/class, last epoch + EMA 0.998 | ✅ |") in out
    assert "science" not in render_section({})
    # where the gap sits: the synthetic-trained classifier's recall of each real class, in the classes' order
    missed = science_row("guidance", 3.0, 1200, 0.7)
    missed["tstr"] = missed["tstr"] | {"recall_per_class": {"a": 0.421, "b": 0.9}}
    out = render_section({"science-diversity-brain-mri": {**curve, "plan": "diversity", "rows": [missed]}})
    assert "| 0.700 [0.690, 0.710] | 0.42 / 0.90 | 0.880 |" in out


def test_science_rows_say_how_the_classifier_picked_its_weights():
    default = science_row("classifier training", "default", 1200, 0.74)
    last = science_row("classifier training", "last", 1200, 0.76)
    last["recipe"] |= {"val_fraction": 0.0, "ema_decay": None}
    ema = science_row("classifier training", "ema", 1200, 0.77)
    ema["recipe"] |= {"val_fraction": 0.1, "ema_decay": 0.998}
    result = {"benchmark": "science-training-all", "date": "2026-12-03", "machine": MACHINE, "domain": "all",
              "plan": "training", "seed": 0, "generator_runs": {}, "rows": [default, last, ema]}
    out = render_section({"science-training-all": result})
    assert "**all — training**" in out
    assert "| default | base @ 1200 | dpmsolver++, w=2, 20 steps, 128/class | 6 ep, aug 1.0 | 0.80 |" in out
    assert "| last | base @ 1200 | dpmsolver++, w=2, 20 steps, 128/class | 6 ep, aug 1.0, last epoch |" in out
    assert "| ema | base @ 1200 | dpmsolver++, w=2, 20 steps, 128/class | 6 ep, aug 1.0, EMA 0.998 |" in out


def test_a_recorded_science_row_is_marked_and_says_where_it_was_read_from():
    fresh = science_row("generator augmentation", "affine", 1200, 0.78)
    again = science_row("generator augmentation", "flips only", 1200, 0.74) | {
        "recorded_in": "science-recipe-brain-mri.json"}
    result = {"benchmark": "science-augment-brain-mri", "date": "2026-12-04", "machine": MACHINE,
              "domain": "brain-mri", "plan": "augment", "seed": 0, "generator_runs": {}, "rows": [again, fresh]}
    out = render_section({"science-augment-brain-mri": result})
    assert "| flips only | base @ 1200 (recorded) |" in out
    assert "| affine | base @ 1200 |" in out
    assert "_(recorded): the same configuration as scored in science-recipe-brain-mri.json" in out


def test_science_reads_back_a_recorded_row_only_for_the_same_configuration(tmp_path, monkeypatch):
    import bench.common
    from bench import science

    scored = science.row("recipe", "cpu-study", step=1200, mixed=True, per_class=512) | {"tstr": {"accuracy": 0.74}}
    (tmp_path / "science-recipe-brain-mri.json").write_text(json.dumps(
        {"domain": "brain-mri", "generator_runs": {"base": {"steps": 1200}}, "rows": [scored]}))
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    same = science.row("generator augmentation", "flips only", step=1200, mixed=True, per_class=512)
    found, run = science.recorded("brain-mri", same)
    assert found["tstr"]["accuracy"] == 0.74 and run == {"steps": 1200}
    assert (found["lever"], found["value"], found["recorded_in"]) == (
        "generator augmentation", "flips only", "science-recipe-brain-mri.json")
    assert science.recorded("brain-mri", science.row("x", "y", step=1200, mixed=True, per_class=128)) is None
    assert science.recorded("brain-mri", same | {"variant": "augment"}) is None
    assert science.recorded("all", same) is None


def test_the_diversity_plan_changes_one_thing_per_row_against_the_recipe_row(tmp_path, monkeypatch):
    from bench import science
    from meddiffuse.config import CPU_STUDY

    monkeypatch.setattr(science, "WORK", tmp_path)
    (tmp_path / "all").mkdir()
    (tmp_path / "all" / "train-base.json").write_text(json.dumps({"ema_variants": [0.0, 0.99, 0.999]}))
    rows = science.plan("diversity", "all", 1200)
    first, rest = rows[0], rows[1:]
    # the recipe row is the study's configuration (its classifier included) and the only one with mixed
    assert (first["sampling"]["per_class"], first["sampling"]["guidance"], first["mixed"]) == (
        CPU_STUDY["synthetic_per_class"], science.FORMER_GUIDANCE, True)  # the recipe these levers were measured around
    assert {k: first["recipe"][k] for k in ("epochs", "val_fraction", "ema_decay")} == {
        k: CPU_STUDY[k] for k in ("epochs", "val_fraction", "ema_decay")}
    assert [r["ema"] for r in rows if r["lever"] == "generator EMA decay"] == [0.99, 0.999]  # raw weights left out
    # guidance is tried on both sides of the recipe's, at the recipe's set size
    guidance = sorted(r["sampling"]["guidance"] for r in rows if r["lever"] == "guidance")
    assert guidance[0] < science.FORMER_GUIDANCE < guidance[-1]
    assert {r["sampling"]["per_class"] for r in rows if r["lever"] == "guidance"} == {CPU_STUDY["synthetic_per_class"]}
    for r in rest:
        changed = {k for k in ("sampling", "recipe", "ema") if r[k] != first[k]}
        assert r["step"] == 1200 and r["recipe"] == first["recipe"] and changed <= {"sampling", "ema"}, r
    assert len({json.dumps([r["sampling"], r["ema"]], sort_keys=True) for r in rows}) == len(rows)


def test_the_combined_plan_pairs_the_diversity_winners_against_the_same_recipe_row(tmp_path, monkeypatch):
    from bench import science
    from meddiffuse.config import CPU_STUDY

    monkeypatch.setattr(science, "WORK", tmp_path)
    (tmp_path / "brain-mri").mkdir()
    (tmp_path / "brain-mri" / "train-base.json").write_text(json.dumps({"ema_variants": [0.99, 0.999]}))
    combined = science.plan("combined", "brain-mri", 1559)
    recipe = science.plan("diversity", "brain-mri", 1559)[0]
    # the same recipe row as the diversity plan's: one cache entry, and the check that both share a footing
    assert {k: combined[1][k] for k in science.CONFIG_KEYS} == {k: recipe[k] for k in science.CONFIG_KEYS}
    # lower guidance with the shorter EMA first, with its mixed classifier (`--first 1` gives the goal's two numbers)
    first = combined[0]
    assert (first["sampling"]["guidance"], first["ema"], first["mixed"]) == (1.0, 0.99, True)
    assert any((r["sampling"]["guidance"], r["ema"]) == (1.5, 0.99) for r in combined)  # the diversity winners paired
    for r in combined[:1] + combined[2:]:
        assert r["step"] == 1559 and r["recipe"] == recipe["recipe"], r
        assert r["sampling"]["per_class"] == CPU_STUDY["synthetic_per_class"]
        assert r["sampling"]["guidance"] < science.FORMER_GUIDANCE
    assert len({json.dumps([r["sampling"], r["ema"]], sort_keys=True) for r in combined}) == len(combined)
    # a run that kept no EMA 0.99 is refused before anything is sampled, with the command that fixes it
    (tmp_path / "brain-mri" / "train-base.json").write_text(json.dumps({"ema_variants": [0.999]}))
    with pytest.raises(SystemExit, match="--ema-variants 0.99"):
        science.plan("combined", "brain-mri", 1559)


def test_the_guidance_plan_scores_the_recipes_w1_against_w2_and_w05_each_with_mixed(tmp_path, monkeypatch):
    from bench import science
    from meddiffuse.config import CPU_STUDY

    monkeypatch.setattr(science, "WORK", tmp_path)
    (tmp_path / "all").mkdir()
    (tmp_path / "all" / "train-bf16-avx512.json").write_text(json.dumps({"ema_variants": []}))  # no extra EMA needed
    lower, former, lowest = science.plan("guidance", "all", 2150, "bf16-avx512")
    # the recipe's own scale (w = 1) is the compute plan's row at the run's last step: one cache entry, one footing
    at_final = science.row("generator steps (recipe)", 2150, variant="bf16-avx512", step=2150, mixed=True,
                           **science.recipe_keys(classifier=True))
    assert CPU_STUDY["guidance"] == lower["sampling"]["guidance"] == 1.0
    assert {k: lower[k] for k in science.CONFIG_KEYS} == {k: at_final[k] for k in science.CONFIG_KEYS}
    # the other rows change guidance alone, on the run's own EMA, each scoring the goal's second half too
    for r, w in ((former, science.FORMER_GUIDANCE), (lowest, 0.5)):
        assert r["sampling"] == lower["sampling"] | {"guidance": w} and r["sampling"] != lower["sampling"]
        assert (r["ema"], r["mixed"], r["recipe"], r["step"]) == (None, True, lower["recipe"], 2150)
    # `evaluate --guidance 0.5` scores that row alone; without a filter every row, in the plan's order
    assert science.chosen_rows([lower, former, lowest], guidance=[0.5]) == [lowest]
    assert science.chosen_rows([lower, former, lowest], at=[2150]) == [lower, former, lowest]
    assert science.chosen_rows([lower, former, lowest], at=[1200]) == []
    assert science.result_name("guidance", "bf16-avx512", "all") == "science-guidance-bf16-avx512-all"
    # a filter that matches no row stops with one line before anything is scored or written
    (tmp_path / "all" / "train-bf16-avx512.json").write_text(json.dumps({"ema_variants": [], "info": {
        "steps_trained": 2150}}))
    from bench.common import RESULTS

    before = sorted(RESULTS.glob("science-guidance-*"))
    with pytest.raises(SystemExit, match="no row of plan 'guidance' matches"):
        science.main(["evaluate", "--domain", "all", "--plan", "guidance", "--variant", "bf16-avx512",
                      "--guidance", "0.7"])
    assert sorted(RESULTS.glob("science-guidance-*")) == before


def test_a_narrowing_filter_adds_its_rows_to_the_plans_file_and_keeps_the_others_of_the_same_run(
        tmp_path, monkeypatch):
    import bench.common
    from bench import science

    monkeypatch.setattr(science, "WORK", tmp_path / "work")
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path / "results")
    (tmp_path / "work" / "all" / "rows").mkdir(parents=True)
    (tmp_path / "results").mkdir()
    record = {"ema_variants": [], "snapshots": [], "overrides": {}, "torch_threads": 2,
              "info": {"steps_trained": 2150, "seconds": 1700.0, "images_per_second": 80.0, "resumed_from_step": None},
              "config": {"preset": "cpu-study", "resolution": 32, "lr_schedule": "constant_with_warmup",
                         "ema_decay": 0.998}}
    train = tmp_path / "work" / "all" / "train-bf16-avx512.json"
    train.write_text(json.dumps(record))
    w1, w2, w05 = science.plan("guidance", "all", 2150, "bf16-avx512")
    run = science.describe_run(record)
    (tmp_path / "results" / "science-guidance-bf16-avx512-all.json").write_text(json.dumps({
        "generator_runs": {"bf16-avx512": run}, "rows": [w1 | {"tstr": 0.94}, w2 | {"tstr": 0.91}]}))
    # the w = 0.5 row as the evaluator caches it once scored (so nothing is sampled or trained here)
    key = science.key_of({k: v for k, v in w05.items() if k not in science.LABELS})
    (tmp_path / "work" / "all" / "rows" / f"{key}.json").write_text(json.dumps(w05 | {"tstr": 0.95}))

    def evaluate_half() -> dict:
        science.main(["evaluate", "--domain", "all", "--plan", "guidance", "--variant", "bf16-avx512",
                      "--guidance", "0.5"])
        return json.loads((tmp_path / "results" / "science-guidance-bf16-avx512-all.json").read_text())

    out = evaluate_half()
    assert [(r["sampling"]["guidance"], r["tstr"]) for r in out["rows"]] == [(1.0, 0.94), (2.0, 0.91), (0.5, 0.95)]
    assert out["generator_runs"] == {"bf16-avx512": run}
    # a re-trained run under the same variant name: the file's rows were another generator's, so they go
    train.write_text(json.dumps(record | {"info": record["info"] | {"seconds": 1800.0}}))
    out = evaluate_half()
    assert [(r["sampling"]["guidance"], r["tstr"]) for r in out["rows"]] == [(0.5, 0.95)]
    assert out["generator_runs"]["bf16-avx512"]["seconds"] == 1800.0


def test_a_plan_that_follows_one_run_writes_one_file_per_variant():
    from bench import science
    from bench.render import SCIENCE_PLANS

    assert science.result_name("combined", "base", "brain-mri") == "science-combined-brain-mri"
    assert science.result_name("combined", "bf16", "brain-mri") == "science-combined-bf16-brain-mri"
    assert science.result_name("diversity", "bf16", "all") == "science-diversity-bf16-all"
    assert science.result_name("size", "bf16", "all") == "science-size-all"  # plans on the base run keep one file
    # and the README orders every per-variant file the bench writes (bf16 first: the recipe's generator)
    assert {"combined-bf16", "diversity-bf16", "compute-bf16", "combined-bf16-avx512"} <= set(SCIENCE_PLANS)
    # a variant's name may hold a dash: the file still names the plan, the variant and the domain
    assert science.result_name("combined", "bf16-avx512", "brain-mri") == "science-combined-bf16-avx512-brain-mri"


def test_the_compute_plan_scores_the_recipe_at_every_snapshot_final_first(tmp_path, monkeypatch):
    from bench import science

    monkeypatch.setattr(science, "WORK", tmp_path)
    (tmp_path / "brain-mri").mkdir()
    (tmp_path / "brain-mri" / "train-bf16.json").write_text(json.dumps({"snapshots": [1200, 2000, 3000]}))
    rows = science.plan("compute", "brain-mri", 3000, "bf16")
    assert [(r["step"], r["mixed"], r["variant"]) for r in rows] == [(3000, True, "bf16"), (2000, False, "bf16"),
                                                                    (1200, False, "bf16")]
    # the recipe's own budget comes first when the run has a snapshot there, with its mixed classifier
    (tmp_path / "brain-mri" / "train-bf16.json").write_text(json.dumps({"snapshots": [1200, 2700, 3000]}))
    from meddiffuse.config import CPU_STUDY

    monkeypatch.setitem(CPU_STUDY, "generator_steps", 2700)
    rows = science.plan("compute", "brain-mri", 3000, "bf16")
    assert [(r["step"], r["mixed"]) for r in rows] == [(2700, True), (3000, True), (1200, False)]
    recipe = science.row("recipe", "cpu-study", step=3000, **science.recipe_keys(classifier=True))
    assert all(r["sampling"] == recipe["sampling"] and r["recipe"] == recipe["recipe"] for r in rows)
    # a run's precision shows beside its budget; float32 runs say nothing extra
    run = {"steps": 3000, "seconds_per_step": 0.53, "torch_threads": 2, "lr_schedule": "constant_with_warmup",
           "resolution": 32, "mixed_precision": "bf16"}
    d = {"benchmark": "science-compute-bf16-brain-mri", "date": "2026-12-06", "machine": MACHINE,
         "domain": "brain-mri", "plan": "compute", "generator_runs": {"bf16": run},
         "rows": [science_row("generator steps (recipe)", 3000, 3000, 0.9, 1.02)]}
    out = render_section({"science-compute-bf16-brain-mri": d})
    assert "(bf16: 3000 steps, 0.53 s/step at 2 thread(s) (constant_with_warmup, 32 px, bf16 autocast);" in out
    assert ("| science-compute-bf16-brain-mri | TSTR accuracy >= 0.90 x TRTR (Lite0, cpu-study) | 1.02 at 3000 steps, "
            "dpmsolver++, 128/class, val-picked epoch | ✅ |") in out
    out = render_section({"science-compute-bf16-brain-mri": d | {"generator_runs": {"bf16": run | {
        "mixed_precision": "no"}}}})
    assert "(constant_with_warmup, 32 px);" in out
    resumed = render_section({"science-compute-bf16-brain-mri": d | {"generator_runs": {"bf16": run | {
        "resumed_from_step": 2200}}}})
    assert "(bf16: 3000 steps, 0.53 s/step after resuming at 2200 at 2 thread(s)" in resumed


def test_report_figure_stops_above_the_first_section_with_real_images(tmp_path):
    """The README's report sample never shows the sample grids (they hold real patients' images)."""
    import shutil

    from PIL import Image

    from bench.report_figure import main

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from meddiffuse.report import RESULTS, SUMMARY

    report = tmp_path / "report.html"
    # any heading that is not a text-only section ends the picture, a new one (not yet listed) included
    for first_with_images in ("Synthetic samples beside real examples", "Closest pairs (a new section)"):
        report.write_text(f"<html><body style='margin:0'><h2 style='margin:0;height:50px'>{SUMMARY}</h2>"
                          f"<h2 style='margin:0;height:550px'>{RESULTS}</h2>"
                          f"<h2 style='margin:0'>{first_with_images}</h2>"
                          "<div style='height:900px;background:red'>real images</div></body></html>")
        out = tmp_path / "sample.png"
        main(["--report", str(report), "--out", str(out), "--chromium", chromium, "--width", "400"])
        with Image.open(out) as im:
            assert im.size == (400, 592)  # 8 px above the heading
            assert all(px[:3] != (255, 0, 0) for px in im.convert("RGB").getdata())
    with pytest.raises(SystemExit, match="not found"):
        main(["--report", str(tmp_path / "absent.html"), "--out", str(out), "--chromium", chromium])
    # a page with only text-only headings is not a report: refused, the earlier picture kept as it was
    before = out.read_bytes()
    report.write_text(f"<html><body><h2>{SUMMARY}</h2><div style='background:red'>?</div></body></html>")
    with pytest.raises(SystemExit, match="nothing written"):
        main(["--report", str(report), "--out", str(out), "--chromium", chromium])
    assert out.read_bytes() == before and not list(tmp_path.glob(".*.part.png"))


def test_bench_metadata_names_the_cpus_bf16_units_as_the_cpu_reports_them():
    """One marketing name covers CPUs with and without AMX, and bf16 training speed depends on which: the
    machine record holds the units the training loop decides bf16 from, and they agree with the CPU's own
    flags (read here from /proc/cpuinfo, independently of torch)."""
    from bench.common import machine
    from bench.render import machine_line
    from meddiffuse.generate.training import cpu_has_native_bf16

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo on this OS: the CPU's flags cannot be read independently")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), [])
    units = machine()["cpu_bf16"]
    assert units == ("amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None)
    assert (units is not None) == cpu_has_native_bf16()
    line = machine_line({"date": "2026-12-07", "machine": {"cpu_model": "AMD EPYC", "cpu_bf16": "avx512_bf16",
                                                           "cpu_count": 2}})
    assert "AMD EPYC with AVX512-BF16, 2 CPUs" in line
    assert " with " not in machine_line({"date": "2026-12-07", "machine": {"cpu_model": "AMD EPYC", "cpu_count": 2}})
