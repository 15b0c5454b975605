"""Render the README's benchmark tables from bench/results/*.json (never typed by hand).

Replaces what lies between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in README.md (or appends a
"## Benchmarks" section holding the markers). ``render_section(results)`` is pure: a dict of result
name (the JSON file's stem, e.g. ``"sampling"``) to its payload in, Markdown out.

    python bench/render.py            # rewrite README.md
    python bench/render.py --check    # exit 1 if README.md is not up to date
    python bench/render.py --stdout   # print the section only
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
START = "<!-- bench:start -->"
END = "<!-- bench:end -->"
STUDY_DOMAINS = ("brain-mri", "all", "covid-ct")
FIDELITY_DOMAINS = ("phantom-brain-mri", "brain-mri")
OK, FAIL = "✅", "❌"


# -- formatting helpers ------------------------------------------------------------------------------------
def _num(x: Any, nd: int = 3) -> str:
    if x is None or isinstance(x, bool) or not isinstance(x, int | float):
        return "—"
    return f"{x:.{nd}f}"


def _ci(ci: Any, nd: int = 3) -> str:
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(isinstance(v, int | float) for v in ci):
        return f" [{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"
    return ""


def _ratio(x: Any, nd: int = 1) -> str:
    return f"{x:.{nd}f}×" if isinstance(x, int | float) and not isinstance(x, bool) else "—"


def _row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


def _mark(met: Any) -> str:
    return OK if met is True else FAIL if met is False else "—"


def _get(d: Any, *path: str, default: Any = None) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def machine_line(d: dict[str, Any]) -> str:
    """'Measured on <date>, <cpu> (N CPUs, GPU), torch x, diffusers y, T threads[, scale s].'"""
    m = d.get("machine") or {}
    cpu = _get(d, "peak", "model") or m.get("cpu_model") or m.get("processor") or "unknown CPU"
    parts = [f"{cpu}" + (f" with {m['cpu_bf16'].upper().replace('_', '-')}" if m.get("cpu_bf16") else "")
             + f", {m.get('cpu_count', '?')} CPUs"]
    if m.get("cuda"):
        parts.append(str(m["cuda"]))
    versions = m.get("versions") or {}
    libs = ", ".join(f"{k} {versions[k]}" for k in ("torch", "diffusers", "timm") if k in versions)
    threads = d.get("threads", m.get("torch_threads"))
    extra = [libs] if libs else []
    if threads is not None:
        extra.append(f"{threads} torch threads")
    if d.get("scale"):
        extra.append(f"scale {d['scale']}")
    if d.get("seed") is not None:
        extra.append(f"seed {d['seed']}")
    return f"_Measured {d.get('date', '?')} on {'; '.join(parts)}" + (f" ({', '.join(extra)})" if extra else "") + "._"


def _targets(d: dict[str, Any]) -> list[str]:
    out = []
    for t in d.get("targets") or []:
        if isinstance(t, dict):
            out.append(f"- {_mark(t.get('met'))} target: {t.get('target', '?')} — measured {t.get('measured', '?')}")
    return out


def _budget(gen: dict[str, Any]) -> str:
    steps = f"{gen['step_budget']} steps" if gen.get("step_budget") else None
    minutes = f"{gen['minutes']:g} min" if isinstance(gen.get("minutes"), int | float) else None
    if steps and minutes:
        return f"{steps} or {minutes}, whichever first"
    return steps or minutes or "—"


def _precision(mixed_precision: str | None) -> str:
    """A run's recorded mixed_precision ("no", "bf16", "fp16") as the README says it."""
    return "float32" if mixed_precision in (None, "no") else f"{mixed_precision} autocast"


def _how_trained(gen: dict[str, Any]) -> str:
    """'1474 steps trained in 29.0 min, float32, stopped by the wall-clock cap': what the run did against its budget."""
    out = f"{gen.get('steps', '?')} steps trained"
    if gen.get("seconds"):
        out += f" in {gen['seconds'] / 60:.1f} min"
    if gen.get("mixed_precision"):  # older runs did not record it
        out += f", {_precision(gen['mixed_precision'])}"
    stopped = gen.get("stopped_by")
    if stopped is None and gen.get("step_budget") and isinstance(gen.get("steps"), int):
        stopped = "steps" if gen["steps"] >= gen["step_budget"] else "minutes"  # runs before stopped_by was kept
    if stopped == "minutes" and gen.get("step_budget"):
        out += ", stopped by the wall-clock cap"
    return out


def _not_run(command: str) -> list[str]:
    return [f"_Not run yet_ (`{command}`)."]


# -- sections ------------------------------------------------------------------------------------------------
def study_section(results: dict[str, dict]) -> list[str]:
    lines = ["### Study: TRTR, TSTR and mixed on unseen real images", ""]
    domains = list(STUDY_DOMAINS) + sorted(k.removeprefix("study-") for k in results
                                           if k.startswith("study-") and k.removeprefix("study-") not in STUDY_DOMAINS)
    rows, audit_rows, notes = [], [], []
    for domain in domains:
        d = results.get(f"study-{domain}")
        if d is None:
            notes.append(f"- {domain}: _not run yet_ (`python bench/study.py --domain {domain}`).")
            continue
        ratios = d.get("ratios") or {}
        order = {"real": 0, "synthetic": 1, "mixed": 2}
        for r in sorted(d.get("results") or [], key=lambda r: (str(r.get("arch")), order.get(r.get("train_data"), 9))):
            kind = r.get("train_data")
            label = {"real": "real (TRTR)", "synthetic": "synthetic (TSTR)", "mixed": "mixed"}.get(kind, kind)
            ratio = _get(ratios, r.get("arch"), f"{kind}/real") if kind in ("synthetic", "mixed") else None
            rows.append([domain, r.get("arch"), label, f"{_num(r.get('accuracy'))}{_ci(r.get('accuracy_ci95'))}",
                         _num(r.get("balanced_accuracy")), _num(r.get("macro_f1")),
                         _num(ratio, 2) if ratio is not None else "—", r.get("n_train", "—")])
        audit = d.get("audit") or {}
        gate = _get(audit, "details", "gate") or {}
        audit_rows.append([domain, _pct(gate.get("flagged_share", audit.get("flagged_share"))),
                           _pct(gate.get("expected_share")), _pct(gate.get("max_flagged_share")),
                           _mark(audit.get("passed")), audit.get("summary") or "—"])
        gen = d.get("generator") or {}
        budget = _budget(gen)
        clf = d.get("classifier") or {}
        picks = ("" if not clf else (f", the best epoch on a {clf['val_fraction']:.0%} val split"
                                     if clf.get("val_fraction") else ", the last epoch")
                 + (f" with weight EMA {clf['ema_decay']:g}" if clf.get("ema_decay") else ""))
        recipe = f" Recipe `{d['recipe']}`" + (f" with {d['overrides']}" if d.get("overrides") else "") + \
            "." if d.get("recipe") else ""
        notes.append(f"- {domain}: {machine_line(d)}{recipe} Generator {gen.get('preset', '?')} {budget} "
                     f"({_how_trained(gen)}), "
                     f"{d.get('synthetic_per_class', '?')} synthetic images per class ({d.get('sampler', '?')}, "
                     f"{d.get('sampling_steps', '?')} steps, guidance "
                     f"{d.get('guidance', '?')}), classifiers {d.get('epochs', '?')} epochs at "
                     f"{d.get('classifier_input', '?')} px{picks}; {d.get('minutes_total', '?')} min in all.")
        notes += ["  " + t for t in _targets(d)]
    if rows:
        lines += _table(["domain", "architecture", "train data", "accuracy [95% CI]", "balanced acc.", "macro-F1",
                         "accuracy ÷ TRTR", "train images"], rows)
        lines += ["", "Synthetic data audit (memorisation gate):", ""]
        lines += _table(["domain", "flagged share", "expected share", "allowed excess", "gate", "verdict"],
                        audit_rows)
        lines.append("")
    return lines + notes + [""]


def _share(percent: Any) -> str:
    return f"{percent:.1f}%" if isinstance(percent, int | float) and not isinstance(percent, bool) else "—"


def _pct(x: Any, nd: int = 1) -> str:
    return f"{100 * x:.{nd}f}%" if isinstance(x, int | float) and not isinstance(x, bool) else "—"


def fidelity_section(results: dict[str, dict]) -> list[str]:
    lines = ["### Class fidelity of the generator", "",
             "Share of generated images that a classifier trained on the real training split assigns to the "
             "class they were conditioned on.", ""]
    domains = list(FIDELITY_DOMAINS) + sorted(
        k.removeprefix("class-fidelity-") for k in results
        if k.startswith("class-fidelity-") and k.removeprefix("class-fidelity-") not in FIDELITY_DOMAINS)
    rows, notes = [], []
    for domain in domains:
        d = results.get(f"class-fidelity-{domain}")
        if d is None:
            notes.append(f"- {domain}: _not run yet_ (`python bench/class_fidelity.py --domain {domain}`).")
            continue
        gen = d.get("generator") or {}
        per_class = d.get("per_class_fidelity") or {}
        budget = _budget(gen)
        rows.append([domain, f"{_num(d.get('class_fidelity'))}{_ci(d.get('class_fidelity_ci95'))}",
                     ", ".join(f"{k} {_num(v, 2)}" for k, v in per_class.items()) or "—",
                     _num(d.get("judge_accuracy_on_real_test")),
                     f"{gen.get('preset', '?')}, {budget} ({gen.get('steps', '?')} steps)",
                     _get(d, "sampling", "per_class", default="—")])
        notes.append(f"- {domain}: {machine_line(d)}")
        notes += ["  " + t for t in _targets(d)]
    if rows:
        lines += _table(["domain", "class fidelity [95% CI]", "per class", "judge accuracy (real test)",
                         "generator", "samples per class"], rows)
        lines.append("")
    return lines + notes + [""]


def sampling_section(d: dict[str, Any] | None) -> list[str]:
    sampler = _get(d or {}, "ours", "sampler", default="dpmsolver++")
    lines = [f"### Sampling: our sampler ({sampler}) against stock 1000-step DDPM (same UNet)", ""]
    if d is None:
        return lines + _not_run("python bench/sampling.py") + [""]
    ours, ddpm, ref = d.get("ours") or {}, d.get("ddpm") or {}, d.get("real_reference")
    rows = []
    for name, arm in ((f"ours: {ours.get('sampler', 'dpmsolver++')}", ours),
                      ("stock DDPM (diffusers DDPMScheduler)", ddpm)):
        t = arm.get("tstr") or {}
        rows.append([name, arm.get("steps", "—"), arm.get("guidance", "—"), _num(arm.get("images_per_second"), 3),
                     _ratio(d.get("speedup")) if arm is ours else "1.0×",
                     f"{_num(t.get('accuracy'))}{_ci(t.get('accuracy_ci95'))}", _seeds(t),
                     _num(t.get("balanced_accuracy")), t.get("n_train", "—")])
    if ref:
        rows.append([f"reference: {ref.get('n_train', '?')} real training images", "—", "—", "—", "—",
                     f"{_num(ref.get('accuracy'))}{_ci(ref.get('accuracy_ci95'))}", _seeds(ref),
                     _num(ref.get("balanced_accuracy")), ref.get("n_train", "—")])
    lines += _table(["sampler", "steps", "guidance", "images/s", "speed-up", "TSTR accuracy [95% CI]",
                     "per classifier seed", "balanced acc.", "train images"], rows)
    gen, budget = d.get("generator") or {}, d.get("budget") or {}
    diff, diff_ci = d.get("tstr_difference_points"), d.get("tstr_difference_ci95_points")
    lines += ["", f"TSTR difference ours − DDPM: {_num(diff, 1)} points{_ci(diff_ci, 1)} (paired bootstrap on the "
                  f"same {_get(ours, 'tstr', 'n_test', default='?')} real test images); classifier "
                  f"{_get(ours, 'tstr', 'arch', default='?')}, {budget.get('classifier_epochs', '?')} epochs at "
                  f"{budget.get('classifier_input', '?')} px, accuracy averaged over "
                  f"{budget.get('classifier_seeds', '?')} classifier seeds (the CIs resample test images only; the "
                  "seed-to-seed spread is the larger uncertainty at this sample size)." + _probe_line(d),
              f"Generator: {gen.get('preset', '?')} ({_num((gen.get('parameters') or 0) / 1e6, 2)} M parameters), "
              f"{gen.get('steps', '?')} steps on {d.get('data', '?')} {d.get('domain', '?')} at "
              f"{d.get('resolution', '?')} px; {budget.get('images', '?')} images per arm in batches of "
              f"{budget.get('batch_size', '?')}.", "", machine_line(d), *_targets(d), ""]
    return lines


def _probe_line(d: dict[str, Any]) -> str:
    probe = d.get("linear_probe")
    if not isinstance(probe, dict):
        return ""
    accs = probe.get("accuracy") or {}
    shown = ", ".join(f"{k} {_num(v)}" for k, v in accs.items())
    return (f" A seed-free check, a linear probe on frozen ImageNet features of each set: {shown}; ours − DDPM "
            f"{_num(probe.get('difference_points'), 1)} points{_ci(probe.get('difference_ci95_points'), 1)}.")


def _seeds(t: dict[str, Any]) -> str:
    accs = [r.get("accuracy") for r in t.get("per_seed") or [] if isinstance(r, dict)]
    return ", ".join(_num(x) for x in accs) or "—"


def explain_section(d: dict[str, Any] | None) -> list[str]:
    """LIME benchmark: per method latency, speed-up and IoU from its ``summary``; other layouts flattened."""
    lines = ["### LIME: batched explanations against `lime_image`", ""]
    if d is None:
        return lines + _not_run("python bench/explain.py") + [""]
    summary = d.get("summary") if isinstance(d.get("summary"), dict) else {}
    methods = [m for m, v in summary.items() if isinstance(v, dict) and "median_seconds" in v
               and m != "ours_on_docs_segments"]
    if methods:
        rows = []
        for m in methods:
            v = summary[m]
            ious = [f"{k.removeprefix('mean_iou_').split('_vs_')[0]} {_num(x, 2)}" for k, x in summary.items()
                    if "iou" in k and k.endswith(f"_vs_{m}")]
            setting = _get(d, "settings", m)
            rows.append([f"`{m}`", _num(v.get("median_seconds"), 2), _num(v.get("median_model_seconds"), 2),
                         _ratio(summary.get(f"speedup_vs_{m}"), 2) if f"speedup_vs_{m}" in summary else "—",
                         ", ".join(ious) or "—", setting if isinstance(setting, str) else "—"])
        lines += _table(["method", "median s / image", "of which model s", "ours is faster by", "IoU with ours",
                         "call"], rows)
        settings = d.get("settings") or {}
        clf = settings.get("classifier") or {}
        lines += ["", f"{settings.get('num_samples', '?')} LIME samples per explanation, {settings.get('images', '?')}"
                      f" images × {settings.get('repeats', '?')} repeats at {settings.get('resolution', '?')} px; "
                      f"classifier {clf.get('arch', '?')} at {clf.get('input_size', '?')} px "
                      f"(held-out accuracy {_num(clf.get('held_out_accuracy'))})."]
        on_docs = summary.get("ours_on_docs_segments")
        if isinstance(on_docs, dict):
            segs = [r.get("lime_docs", {}).get("n_segments") for r in d.get("per_image") or []]
            segs = [n for n in segs if isinstance(n, int)]
            lines += ["", f"On `lime_docs`' own superpixels (quickshift, {min(segs, default='?')}–"
                          f"{max(segs, default='?')} per image) with its `hide_color=0`, ours takes "
                          f"{_num(on_docs.get('median_seconds'), 2)} s per image and its top-5 mask has IoU "
                          f"{_num(summary.get('mean_iou_superpixels_on_docs_segments'), 2)} with `lime_image`'s. "
                          "Ours calls the classifier through `Classifier.optimize_for_inference` (a frozen "
                          "TorchScript snapshot: batch norm folded, weights pre-packed); `lime_docs` calls the eager "
                          "model, as a user following its documentation would; `lime_slic` calls the same frozen "
                          "model as ours, so its ratio is the engine alone."]
    else:
        flat = [(k, v) for k, v in _flatten(d) if not k.startswith(("machine", "targets", "benchmark", "date"))]
        lines += _table(["measure", "value"], [[k, _value(v)] for k, v in flat[:30]]) if flat else [
            "_No figures in explain.json._"]
    return lines + ["", machine_line(d), *_targets(d), ""]


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(d, int | float | str | bool) or d is None:
        if not (isinstance(d, str) and len(d) > 80):
            out.append((prefix, d))
    elif isinstance(d, list) and len(d) <= 4 and all(isinstance(v, int | float) for v in d):
        out.append((prefix, d))
    return out


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return _mark(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return "—" if v is None else str(v)


def train_speed_section(d: dict[str, Any] | None) -> list[str]:
    lines = ["### Diffusion training speed and UNet FLOP rate", ""]
    if d is None:
        return lines + _not_run("python bench/train_speed.py") + [""]
    tr, unet, budget = d.get("training") or {}, d.get("unet") or {}, d.get("budget") or {}
    rows = []
    for name, key, gkey in (("ours: `train_generator`", "ours", "ours_gflops"),
                            ("minimal diffusers-example loop", "minimal", "minimal_gflops")):
        arm = tr.get(key) or {}
        runs = ", ".join(_num(x, 1) for x in arm.get("runs") or [])
        rows.append([name, _num(arm.get("images_per_second"), 1), runs or "—", _num(tr.get(gkey), 1)])
    lines += _table(["training loop", "images/s (median)", "repeats", "GFLOP/s (fwd+bwd)"], rows)
    lines += ["", f"Ours ÷ minimal: {_ratio(tr.get('ratio_ours_to_minimal'), 2)} — UNet {unet.get('preset', '?')} "
                  f"({_num((unet.get('parameters') or 0) / 1e6, 2)} M parameters) at {unet.get('resolution', '?')} px, "
                  f"batch {budget.get('batch_size', '?')}, {budget.get('timed_steps', '?')} timed steps after "
                  f"{budget.get('warmup_steps', '?')} warm-up, {budget.get('repeats', '?')} repeats alternating.", ""]
    fwd, peak = d.get("forward") or {}, d.get("peak") or {}
    lever_rows = []
    for v in fwd.get("levers") or []:
        if v.get("error"):
            lever_rows.append([v.get("name"), v.get("batch", "—"), v.get("threads", "—"), "failed", "—", "—", "—",
                               v["error"][:80]])
            continue
        note = f"compile {v['compile_seconds']:.0f} s" if v.get("compile_seconds") else ""
        lever_rows.append([v.get("name"), v.get("batch"), v.get("threads"), _num(v.get("images_per_second"), 1),
                           _num(v.get("gflops"), 1), _share(v.get("percent_of_peak")),
                           _share(v.get("percent_of_used_cores_peak")), note])
    if lever_rows:
        lines += [f"UNet forward ({_num(fwd.get('gflop_per_image'), 3)} GFLOP per image, counted by "
                  "`FlopCounterMode`, multiply-add = 2):", ""]
        lines += _table(["lever", "batch", "threads", "images/s", "GFLOP/s", "% of fp32 peak",
                                      "% of its threads' cores' peak", "note"], lever_rows)
        lines.append("")
    if peak.get("gflops_fp32"):
        lines.append(f"fp32 peak {peak['gflops_fp32']:.0f} GFLOP/s = {peak.get('cores')} cores × "
                     f"{_num(peak.get('mhz'), 0)} MHz ({peak.get('mhz_source')}) × "
                     f"{peak.get('flop_per_cycle_per_core')} FLOP/cycle; {peak.get('assumption', '')}.")
    elif peak:
        lines.append(f"Peak: {peak.get('assumption', 'unknown')}.")
    if "bf16_native_for_recipe" in peak:  # runs before 2026-12-07 did not ask the library
        listed = ", ".join(peak.get("bf16_instructions") or []) or "none"
        # the library's answer in that run (AMX only before 2026-12-07; AMX or AVX512-BF16 since)
        lines.append(f"Native bf16 for the `cpu-study` recipe's bf16 generator, as the library judged it in this run: "
                     f"{'yes' if peak['bf16_native_for_recipe'] else 'no (the recipe trains in float32 here)'}; "
                     f"bf16 instructions listed by the CPU: {listed}.")
    sgemm = d.get("sgemm_reference") or {}
    if sgemm:
        lines += ["", "For scale, a plain fp32 2048² matmul in the same run: "
                  + ", ".join(f"{_num(v, 1)} GFLOP/s on {k}" for k, v in sgemm.items()) + "."]
        for note in _sgemm_check(peak, sgemm, fwd):
            lines += ["", note]
    return lines + ["", machine_line(d), *_targets(d), ""]


def _sgemm_check(peak: dict[str, Any], sgemm: dict[str, Any], fwd: dict[str, Any]) -> list[str]:
    """Flag a computed peak that a plain matmul beats, and give the share of an empirical ceiling instead."""
    one = sgemm.get("1 thread(s)")
    cores, total = peak.get("cores"), peak.get("gflops_fp32")
    if not isinstance(one, int | float) or not isinstance(cores, int) or not isinstance(total, int | float):
        return []
    best = max((v.get("gflops") or 0 for v in fwd.get("levers") or [] if v.get("dtype") == "float32"), default=0)
    ceiling = one * cores
    out = []
    if one > total / cores:
        out.append(f"⚠️ One thread's matmul ({one:.0f} GFLOP/s) beats the computed one-core peak "
                   f"({total / cores:.0f}): the clock used ({_num(peak.get('mhz'), 0)} MHz) is below the real one "
                   "(turbo is not visible to the guest), so the shares of peak above are overstated.")
    if best:
        out.append(f"Against an empirical ceiling of cores × one thread's matmul rate ({ceiling:.0f} GFLOP/s), the "
                   f"best float32 forward ({best:.1f} GFLOP/s) is {100 * best / ceiling:.0f}%.")
    return out


def levers_section(results: dict[str, dict]) -> list[str]:
    """bench/levers.py: TSTR of subsets of one pool per guidance (size, judge filtering)."""
    names = sorted(k for k in results if k.startswith("levers-"))
    if not names:
        return []
    lines = ["### What moves TSTR: synthetic-set size, guidance, judge filtering", ""]
    for name in names:
        d = results[name]
        gen, trtr = d.get("generator") or {}, d.get("trtr") or {}
        fidelity = {p.get("guidance"): p.get("class_fidelity") for p in d.get("pools") or []}
        rows = [[_num(r.get("guidance"), 1), r.get("subset", "?"), r.get("n_train", "—"),
                 _num(fidelity.get(r.get("guidance"))), _num(r.get("set_class_fidelity")),
                 f"{_num(r.get('accuracy'))}{_ci(r.get('accuracy_ci95'))}", _num(r.get("balanced_accuracy")),
                 _ratio(r.get("tstr_over_trtr"), 2)] for r in d.get("results") or []]
        guidance = ", ".join(_num(p.get("guidance"), 1) for p in d.get("pools") or [])
        lines += [f"**{d.get('domain', name)}, guidance {guidance}** — generator {gen.get('preset', '?')} at "
                  f"{d.get('resolution', '?')} px, {gen.get('steps', '?')} steps; classifier {d.get('arch', '?')} "
                  f"({d.get('epochs', '?')} epochs, "
                  f"{d.get('classifier_input', '?')} px); TRTR {_num(trtr.get('accuracy'))} on "
                  f"{trtr.get('n_train', '?')} real images. Class fidelity = share of samples the real-trained "
                  "judge assigns to their own class.", ""]
        lines += _table(["guidance", "subset", "train images", "pool class fidelity", "subset class fidelity",
                         "TSTR accuracy [95% CI]", "balanced acc.", "TSTR ÷ TRTR"], rows)
        lines += ["", machine_line(d), ""]
    return lines


SCIENCE_PLANS = ("compute-bf16", "compute-bf16-avx512", "guidance-bf16-avx512", "combined-bf16-avx512",
                 "combined-bf16", "diversity-bf16",
                 "curve", "recipe", "diversity", "combined", "size", "training", "augment", "resolution", "sampling",
                 "classifier", "generator")


def _science_rows(d: dict[str, Any]) -> list[list[Any]]:
    out = []
    for r in d.get("rows") or []:
        gen = f"{r.get('variant', '?')} @ {r.get('generator_steps', '?')}" + (
            "" if r.get("ema") is None else f", EMA {r['ema']:g}" if r["ema"] else ", raw weights") + (
            " (recorded)" if r.get("recorded_in") else "")
        s, c = r.get("sampling") or {}, r.get("recipe") or {}
        sampling = (f"{s.get('sampler', '?')}, w={s.get('guidance', '?'):g}, {s.get('steps', '?')} steps, "
                    f"{s.get('per_class', '?')}/class")
        ms = f"{_num(r.get('ms_ssim'), 2)} ({_num(r.get('real_ms_ssim'), 2)})"
        per_class = r.get("per_class") or {}
        class_cov = " / ".join(_num((v or {}).get("coverage"), 2) for v in per_class.values()) or "—"
        tstr = r.get("tstr") or {}
        recall = " / ".join(_num(v, 2) for v in (tstr.get("recall_per_class") or {}).values()) or "—"
        out.append([r.get("lever", "?"), r.get("value", "?"), gen, sampling,
                    f"{c.get('epochs', '?')} ep, aug {c.get('augmentation_strength', '?')}"
                    + (f", mix {c.get('mixup'):g}/{c.get('cutmix'):g}" if c.get("mixup") or c.get("cutmix") else "")
                    # rows from before these keys were recorded held out 10% and kept no EMA
                    + (", last epoch" if c.get("val_fraction") == 0 else "")
                    + (f", EMA {c['ema_decay']:g}" if c.get("ema_decay") else ""),
                    _num(r.get("class_fidelity"), 2), _num(r.get("coverage"), 2), class_cov, _num(r.get("recall"), 2),
                    _num(r.get("fd"), 1), ms, f"{_num(tstr.get('accuracy'))}{_ci(tstr.get('accuracy_ci95'))}", recall,
                    _num((r.get("trtr") or {}).get("accuracy")), _ratio(r.get("tstr_over_trtr"), 2),
                    _ratio(r.get("mixed_over_trtr"), 2), _mark(r.get("gate_passed"))])
    return out


def science_section(results: dict[str, dict]) -> list[str]:
    """bench/science.py: scaling curves and levers, one row per configuration, diversity beside every row."""
    names = [f"science-{plan}-{domain}" for plan in SCIENCE_PLANS for domain in STUDY_DOMAINS
             if f"science-{plan}-{domain}" in results]
    names += sorted(k for k in results if k.startswith("science-") and k not in names and "rows" in results[k])
    if not names:
        return []
    lines = ["### Closing the TSTR gap: scaling curves and levers (bench/science.py)", "",
             "One generator run per domain and variant at 32 px (`cpu-study`: `cpu-small` with a constant LR "
             "after warm-up, so a snapshot at N steps is what an N-step run gives); EfficientNet-Lite0 (offline "
             "ImageNet weights, 96 px input) trained on the synthetic set and scored on the real 80% test split; "
             "TRTR = the same recipe on the real 20%. Class fidelity: share of samples the real-trained judge assigns "
             "to their own class; coverage/recall/FD in the judge's feature space against the real training "
             "images; MS-SSIM within class (synthetic, real in brackets; higher = less diverse); gate = the "
             "audit's copy gate.", ""]
    if "science-curve-brain-mri" in results or "science-curve-all" in results:
        lines += ["![Scaling curves](bench/results/science-curves.png)", ""]
    header = ["lever", "value", "generator @ steps", "sampling", "classifier", "class fidelity", "coverage",
              "coverage per class", "recall", "FD", "MS-SSIM syn (real)", "TSTR acc. [95% CI]",
              "TSTR recall per class", "TRTR", "TSTR ÷ TRTR", "mixed ÷ TRTR", "gate"]
    for name in names:
        d = results[name]
        runs = d.get("generator_runs") or {}
        budget = "; ".join(f"{v}: {r.get('steps', '?')} steps, {_num(r.get('seconds_per_step'), 2)} s/step"
                           # a resumed run's rate is its last session's
                           + (f" after resuming at {r['resumed_from_step']}" if r.get("resumed_from_step") else "")
                           + (f" at {r['torch_threads']} thread(s)" if r.get("torch_threads") else "")
                           + f" ({r.get('lr_schedule', '?')}, {r.get('resolution', '?')} px"
                           + (f", {_precision(r['mixed_precision'])}" if r.get("mixed_precision", "no") != "no" else "")
                           + ")" for v, r in runs.items())
        first = next(iter(d.get("rows") or [{}]))
        classes = " / ".join(first.get("per_class") or {}) or "?"
        lines += [f"**{d.get('domain', name)} — {d.get('plan', '?')}** ({budget}; classes in per-class columns: "
                  f"{classes})", ""]
        lines += _table(header, _science_rows(d))
        again = sorted({r["recorded_in"] for r in d.get("rows") or [] if r.get("recorded_in")})
        if again:  # rows whose generator was not in the run's working folder
            lines += ["", f"_(recorded): the same configuration as scored in {', '.join(again)}, read back, not "
                          "re-run: on one torch thread a fresh re-run reproduces every metric of a row._"]
        lines += ["", machine_line(d), ""]
    return lines


def cuda_section(d: dict[str, Any] | None) -> list[str]:
    """bench/cuda_check.py, run where a GPU is present: the CUDA path and its timings."""
    if not d:
        return []
    c = d.get("checks") or {}
    g, base, clf, lime = (c.get(k) or {} for k in ("generator", "gpu_base", "classifier", "lime"))
    rows = [
        ["generator `cpu-small` 32 px (mixed precision)", _mark(g.get("ok")),
         # results from before the sampler was recorded were made with the then-default ODE solver
         f"train {_num(g.get('train_images_per_second'), 0)} images/s; guided {g.get('sampler', 'dpmsolver++')} "
         "20 steps "
         f"{_num(g.get('sample_images_per_second'), 0)} images/s; an image drawn alone equals the same seed in a "
         f"batch: {_mark(g.get('alone_equals_in_batch'))}; killed-and-resumed vs uninterrupted: max weight "
         f"difference {_num(g.get('resumed_vs_uninterrupted_max_weight_diff'), 3)} (GPU kernels are not "
         "bit-deterministic; on CPU the two are bit-identical)"],
        ["generator `gpu-base` 128 px", _mark(base.get("ok")),
         f"{_num((base.get('parameters') or 0) / 1e6, 1)} M parameters, train "
         f"{_num(base.get('train_images_per_second'), 0)} images/s at batch {base.get('batch_size', '?')}"],
        ["classifier EfficientNet-Lite0", _mark(clf.get("ok")),
         f"trained and evaluated on {clf.get('device', '?')}; save → load max probability difference "
         f"{_num(clf.get('reload_max_prob_diff'), 6)}"],
        ["LIME, 1000 samples", _mark(lime.get("ok")),
         f"{_num(lime.get('seconds_per_image_median'), 3)} s per image once warm (first two images "
         f"{_num(lime.get('first_two_images_seconds'), 1)} s: CUDA start-up and kernel selection); padded last "
         f"batch explains identically: max weight difference {_num(lime.get('padded_vs_plain_max_weight_diff'), 6)}"],
    ]
    return ["### The CUDA path (`bench/cuda_check.py`, phantoms)", "",
            *_table(["check", "ok", "measured"], rows), "", machine_line(d) + f" torch {c.get('torch', '?')}.", ""]


def runner_section(results: dict[str, dict]) -> list[str]:
    lines = []
    for name in sorted(k for k in results if k.startswith("runner-")):
        d = results[name]
        rows = [[b.get("name"), _mark(b.get("ok")), _num(b.get("minutes"), 1), _num(b.get("expected_minutes"), 0)]
                for b in d.get("benchmarks") or []]
        lines += [f"### Last `python -m bench --scale {d.get('scale', '?')}` run", ""]
        lines += _table(["benchmark", "ok", "minutes", "expected"], rows)
        total, limit = d.get("minutes_total"), d.get("limit_minutes")
        met = None if total is None or limit is None else total <= limit
        lines += ["", f"{_mark(met)} total {_num(total, 1)} min (limit {_num(limit, 0)} min). {machine_line(d)}", ""]
    return lines


def study_targets(results: dict[str, dict]) -> list[list[str]]:
    """The study's two targets per domain, derived from each study JSON's TSTR/TRTR and mixed/TRTR ratios."""
    rows = []
    for name in sorted(k for k in results if k.startswith("study-")):
        ratios = results[name].get("ratios") or {}
        tstr = {a: r.get("synthetic/real") for a, r in ratios.items() if isinstance(r, dict)}
        mixed = {a: r.get("mixed/real") for a, r in ratios.items() if isinstance(r, dict)}
        if any(v is None for v in [*tstr.values(), *mixed.values()]) or not tstr:
            continue
        shown = "; ".join(f"{a} {tstr[a]:.2f}" for a in tstr)
        rows.append([name, "TSTR accuracy >= 0.90 x TRTR", shown, _mark(all(v >= 0.9 for v in tstr.values()))])
        shown = "; ".join(f"{a} {mixed[a]:.2f}" for a in mixed)
        rows.append([name, "mixed accuracy >= TRTR", shown, _mark(all(v >= 1.0 for v in mixed.values()))])
    for name in sorted(k for k in results if k.startswith(("science-curve-", "science-recipe-", "science-compute-"))):
        budgets = ("generator steps", "recipe", "generator steps (recipe)")
        curve = [r for r in results[name].get("rows") or [] if r.get("lever") in budgets
                 and isinstance(r.get("tstr_over_trtr"), int | float)]
        if not curve:
            continue
        last = max(curve, key=lambda r: r.get("generator_steps") or 0)
        sampling = last.get("sampling") or {}
        clf = {"val_fraction": 0.1, "ema_decay": None, **(last.get("recipe") or {})}  # = bench/science.py RECIPE_ADDED
        picks = "last epoch" if not clf["val_fraction"] else "val-picked epoch"
        at = (f"{last.get('generator_steps')} steps, {sampling.get('sampler', '?')}, "
              f"{sampling.get('per_class', '?')}/class, {picks}" + (f" + EMA {clf['ema_decay']:g}"
                                                                   if clf["ema_decay"] else ""))
        rows.append([name, "TSTR accuracy >= 0.90 x TRTR (Lite0, cpu-study)",
                     f"{last['tstr_over_trtr']:.2f} at {at}", _mark(last["tstr_over_trtr"] >= 0.9)])
        if isinstance(last.get("mixed_over_trtr"), int | float):
            gate = "audit gate passed" if last.get("gate_passed") else "audit gate FAILED"
            rows.append([name, "mixed accuracy >= TRTR, audit gate passed", f"{last['mixed_over_trtr']:.3f}; {gate}",
                         _mark(last["mixed_over_trtr"] >= 1.0 and bool(last.get("gate_passed")))])
    return rows


def serve_section(d: dict[str, Any] | None) -> list[str]:
    """The services bench: its own table function, so the printed and the README tables are one."""
    if not d:
        return []
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).with_name("serve.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return ["### Services: HTTP against in-process (`bench/serve.py`)", "", module.markdown_table(d), ""]


def cli_startup_section(d: dict[str, Any] | None) -> list[str]:
    if not d:
        return _not_run("python bench/cli_startup.py --before <checkout>")
    med = d["median_seconds"]
    return ["### Registry command start-up (`bench/cli_startup.py`)", "",
            *_table(["code", "commit", "median s", "runs (s)"], [
                [k, d[f"{k}_commit"], _num(med[k], 2), ", ".join(_num(x, 2) for x in d["seconds"][k])]
                for k in ("before", "after")
            ]), "", f"{d['command']}: {_ratio(d['speedup'])} faster (median of {d['repeats']} alternating runs). "
            "The registry package no longer imports torch; the CLI imports science modules only inside the "
            "commands that use them.", "", machine_line(d), ""]


def summary_section(results: dict[str, dict]) -> list[str]:
    rows = study_targets(results)
    for name in sorted(results):
        for t in results[name].get("targets") or []:
            if isinstance(t, dict):
                rows.append([name, t.get("target", "?"), t.get("measured", "?"), _mark(t.get("met"))])
    if not rows:
        return []
    return ["Targets at a glance:", "", *_table(["benchmark", "target", "measured", "met"], rows), ""]


def render_section(results: dict[str, dict]) -> str:
    """The README's benchmark section, markers included, from {result name: payload}."""
    lines = [START, "<!-- generated by bench/render.py from bench/results/*.json: edit those, not this -->", "",
             "`make bench` runs every benchmark at small scale (budgeted for under 90 minutes on 2 CPU cores) and "
             "then rewrites this section; `make bench-full` runs the larger scale (on a GPU when present). Each "
             "benchmark also runs alone: `python bench/<name>.py --help`. Timings are medians of repeated runs; "
             "comparisons are ratios measured side by side in one run.", ""]
    lines += summary_section(results)
    lines += study_section(results)
    lines += fidelity_section(results)
    lines += science_section(results)
    lines += levers_section(results)
    lines += sampling_section(results.get("sampling"))
    for name in sorted(k for k in results if k.startswith("sampling-")):
        lines += sampling_section(results[name])
    lines += explain_section(results.get("explain"))
    lines += train_speed_section(results.get("train-speed"))
    lines += cuda_section(results.get("cuda-check"))
    lines += serve_section(results.get("serve"))
    if "cli-startup" in results:
        lines += cli_startup_section(results["cli-startup"])
    lines += runner_section(results)
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n" + END


def replace_section(text: str, section: str) -> str:
    """``text`` with ``section`` between (and including) the markers; appended as "## Benchmarks" if absent."""
    start, end = text.find(START), text.find(END)
    if start != -1 and end > start:
        return text[:start] + section + text[end + len(END):]
    return text.rstrip("\n") + "\n\n## Benchmarks\n\n" + section + "\n"


def load_results(folder: Path = RESULTS) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"[render] skipping {path.name}: {exc}", file=sys.stderr)
            continue
        if isinstance(data, dict):
            results[path.stem] = data
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--check", action="store_true", help="exit 1 if the README's section is out of date")
    p.add_argument("--stdout", action="store_true", help="print the section instead of writing the README")
    a = p.parse_args(argv)
    section = render_section(load_results(a.results))
    if a.stdout:
        print(section)
        return 0
    old = a.readme.read_text() if a.readme.exists() else ""
    new = replace_section(old, section)
    if a.check:
        if new != old:
            print(f"[render] {a.readme} is out of date: run python bench/render.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        a.readme.write_text(new)
    print(f"[render] {'updated' if new != old else 'unchanged'}: {a.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
