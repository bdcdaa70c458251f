"""Turn the two sides' raw measurements into the bench's numbers (MFU, ratios, verdict) and print them."""

from __future__ import annotations

from mllm.bench.flops import ModelSizes, sample_flops

TARGETS = {1: 1.5, 2: 1.3}
"""mllm / reference samples/s the bench must reach on each stage (and peak RSS no higher than the reference's)."""

SUMMARY_KEYS = (
    "samples_per_s",
    "real_tokens_per_s",
    "padding_share",
    "peak_rss_mb",
    "worker_peak_rss_mb",
    "mfu",
    "achieved_tflops",
    "data_wait_share",
    "samples_per_cpu_s",
    "cpu_s",
    "worker_cpu_s",
    "timed_steps",
    "samples",
    "elapsed_s",
    "mean_length",
    "flops_per_sample",
    "epoch_estimate_s",
    "final_loss",
)


def summarise(raw: dict, sizes: ModelSizes, peak_flops: float, stage: int) -> dict:
    """A side's result with FLOPs, MFU and an epoch estimate added; per-sample lists dropped."""
    out = {k: v for k, v in raw.items() if k not in ("lengths", "images")}
    flops = sum(
        sample_flops(sizes, t, i, llm_trained=stage == 2)
        for t, i in zip(raw["lengths"], raw["images"], strict=True)
    )
    out["flops"] = flops
    out["flops_per_sample"] = flops / max(raw["samples"], 1)
    out["achieved_tflops"] = flops / raw["elapsed_s"] / 1e12
    out["mfu"] = flops / raw["elapsed_s"] / peak_flops
    out["mean_length"] = raw["real_tokens"] / max(raw["samples"], 1)
    n = raw.get("dataset_samples")
    if n:
        out["epoch_estimate_s"] = n / raw["samples_per_s"]
        fill = raw.get("settings", {}).get("cache_fill_s")
        if fill is not None:
            out["epoch_estimate_with_cache_fill_s"] = out["epoch_estimate_s"] + fill
    return out


def compare(ours: dict, ref: dict, stage: int) -> dict:
    ratio = {
        "samples_per_s": ours["samples_per_s"] / ref["samples_per_s"],
        "real_tokens_per_s": ours["real_tokens_per_s"] / ref["real_tokens_per_s"],
        "mfu": ours["mfu"] / ref["mfu"],
        "peak_rss": ours["peak_rss_mb"] / ref["peak_rss_mb"],
    }
    target = TARGETS[stage]
    verdict = {
        "target_samples_per_s_ratio": target,
        "speed_met": ratio["samples_per_s"] >= target,
        "rss_met": ours["peak_rss_mb"] <= ref["peak_rss_mb"],
    }
    verdict["met"] = verdict["speed_met"] and verdict["rss_met"]
    return {"ratio": ratio, "verdict": verdict}


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key in ("padding_share", "mfu", "data_wait_share"):
        return f"{100 * v:.1f}%"
    if key in ("timed_steps", "samples"):
        return str(int(v))
    if key == "flops_per_sample":
        return f"{v / 1e9:,.2f} G"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def format_report(result: dict) -> str:
    ref, ours = result["reference"], result["mllm"]
    m = result["machine"]
    lines = [
        f"stage {result['stage']} · work {result['work']} · micro-batch {result['batch_size']} · {m['dtype']} · "
        f"{m['threads']} threads · warm-up {result['warmup']} steps excluded",
        f"measured {m['dtype']} matmul peak: {m['peak_flops'] / 1e9:,.0f} GFLOP/s "
        f"(by size: {', '.join(f'{k}: {v / 1e9:,.0f}' for k, v in m['peak_by_size'].items())})",
        "MFU counts the standard full computation for both sides:",
        result["flop_formula"],
        "",
        f"{'':<22}{'reference':>14}{'mllm':>14}{'mllm/ref':>10}",
    ]
    for key in SUMMARY_KEYS:
        if key not in ref and key not in ours:
            continue
        r, o = ref.get(key), ours.get(key)
        ratio = f"{o / r:.2f}×" if isinstance(r, (int, float)) and isinstance(o, (int, float)) and r else ""
        lines.append(f"{key:<22}{_fmt(key, r):>14}{_fmt(key, o):>14}{ratio:>10}")
    fill = ours.get("settings", {}).get("cache_fill_s")
    if fill is not None:
        lines.append(
            f"mllm feature cache: {ours['settings']['cache_filled_images']} image(s) computed this run "
            f"in {fill:.1f} s (reused by later epochs, stages and runs)"
        )
    v = result["verdict"]
    lines.append(
        f"verdict: samples/s ratio {result['ratio']['samples_per_s']:.2f}× (target ≥ {v['target_samples_per_s_ratio']}×) "
        f"{'MET' if v['speed_met'] else 'NOT MET'}; peak RSS {ours['peak_rss_mb']:,.0f} vs {ref['peak_rss_mb']:,.0f} MiB "
        f"{'MET' if v['rss_met'] else 'NOT MET'}"
    )
    if result.get("levers"):
        base = result["levers_base"]
        lines += [
            "",
            f"levers: mllm with one lever off, {base['timed_steps']} timed steps on the same batches as the "
            "all-on row; 'MFU vs ref' = length-normalised speed against the reference above",
            f"{'off':<18}{'samples/s':>11}{'vs all on':>11}{'MFU vs ref':>12}{'per CPU-s':>11}{'vs all on':>11}"
            f"{'tokens/s':>10}{'padding':>9}{'RSS MiB':>9}{'data wait':>11}",
        ]
        for row in [{"lever": "(all on)", **base}] + result["levers"]:
            lines.append(
                f"{row['lever']:<18}{row['samples_per_s']:>11.2f}{row['samples_per_s'] / base['samples_per_s']:>10.2f}×"
                f"{row['mfu'] / ref['mfu']:>11.2f}×{row['samples_per_cpu_s']:>11.2f}"
                f"{row['samples_per_cpu_s'] / base['samples_per_cpu_s']:>10.2f}×{row['real_tokens_per_s']:>10,.0f}"
                f"{100 * row['padding_share']:>8.1f}%{row['peak_rss_mb']:>9,.0f}{100 * row['data_wait_share']:>10.1f}%"
            )
    return "\n".join(lines)
