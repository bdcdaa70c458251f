"""Turn the sides' raw measurements into the bench's numbers (MFU, per-round ratios, their median and spread,
the verdict against the targets) and print them."""

from __future__ import annotations

import statistics

from mllm.bench.flops import ModelSizes, sample_flops
from mllm.bench.rows import RSS_TARGET, get_row

SUMMED_OVER_RANKS = (
    "samples",
    "real_tokens",
    "supervised_tokens",
    "peak_rss_mb",
    "worker_peak_rss_mb",
    "cpu_s",
    "worker_cpu_s",
)


def merge_ranks(ranks: list[dict]) -> dict:
    """One side's result from its processes' results: counts, CPU and peak RSS summed, the clock of the slowest
    process (a step ends when every process ends it), per-sample lists joined."""
    ranks = sorted(ranks, key=lambda r: r.get("rank", 0))
    if len(ranks) == 1:
        return ranks[0]
    out = dict(ranks[0])
    for key in SUMMED_OVER_RANKS:
        out[key] = sum(r[key] for r in ranks)
    out["elapsed_s"] = max(r["elapsed_s"] for r in ranks)
    out["setup_s"] = max(r["setup_s"] for r in ranks)
    out["samples_per_s"] = out["samples"] / out["elapsed_s"]
    out["real_tokens_per_s"] = out["real_tokens"] / out["elapsed_s"]
    slots = sum(r["real_tokens"] / max(1 - r["padding_share"], 1e-9) for r in ranks)
    out["padding_share"] = 1 - out["real_tokens"] / max(slots, 1e-9)
    out["samples_per_cpu_s"] = out["samples"] / max(out["cpu_s"] + out["worker_cpu_s"], 1e-9)
    out["lengths"] = [n for r in ranks for n in r["lengths"]]
    out["images"] = [n for r in ranks for n in r["images"]]
    out["ranks"] = len(ranks)
    return out


def summarise(raw: dict, sizes: ModelSizes, peak_flops: float, llm_trained: bool) -> dict:
    """A side's result with FLOPs, MFU and epoch estimates added; per-sample lists dropped."""
    out = {k: v for k, v in raw.items() if k not in ("lengths", "images")}
    flops = sum(
        sample_flops(sizes, t, i, llm_trained=llm_trained)
        for t, i in zip(raw["lengths"], raw["images"], strict=True)
    )
    out["flops"] = flops
    out["flops_per_sample"] = flops / max(raw["samples"], 1)
    out["mfu"] = flops / raw["elapsed_s"] / peak_flops
    out["mean_length"] = raw["real_tokens"] / max(raw["samples"], 1)
    n = raw.get("dataset_samples")
    if n:
        # one epoch, start-up included (a feature cache filled before the first step is in setup_s)
        out["epoch_estimate_s"] = raw["setup_s"] + n / raw["samples_per_s"]
    return out


def ratios(ours: dict, ref: dict) -> dict:
    """mllm / reference for one round."""
    out = {
        "samples_per_s": ours["samples_per_s"] / ref["samples_per_s"],
        "real_tokens_per_s": ours["real_tokens_per_s"] / ref["real_tokens_per_s"],
        "mfu": ours["mfu"] / ref["mfu"],
        "peak_rss": ours["peak_rss_mb"] / ref["peak_rss_mb"],
    }
    if "epoch_estimate_s" in ours and "epoch_estimate_s" in ref:
        out["epoch_time"] = ours["epoch_estimate_s"] / ref["epoch_estimate_s"]
    return out


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def row_verdict(name: str, rounds: list[dict]) -> dict:
    """Median and min–max of each per-round ratio, and the row's verdict against its targets."""
    keys = rounds[0]["ratio"].keys()
    summary = {k: spread([r["ratio"][k] for r in rounds]) for k in keys}
    target = get_row(name).target
    speed_met = summary["samples_per_s"]["median"] >= target
    rss_met = summary["peak_rss"]["median"] <= RSS_TARGET
    return {
        "ratio": summary,
        "target_samples_per_s_ratio": target,
        "target_peak_rss_ratio": RSS_TARGET,
        "speed_met": speed_met,
        "rss_met": rss_met,
        "met": speed_met and rss_met,
    }


def _range(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f}× [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def format_report(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"work {result['work']} · micro-batch {result['batch_size']} · {m['dtype']} · {result['nprocs']} process(es) "
        f"per side · {result['steps']} timed steps after {result['warmup']} warm-up · {result['rounds']} round(s), "
        "sides alternating (reference, mllm, …)",
        f"measured {m['dtype']} matmul peak: {m['peak_flops'] / 1e9:,.0f} GFLOP/s; MFU counts the standard full "
        "computation for both sides:",
        result["flop_formula"],
        "",
    ]
    for name, row in result["rows"].items():
        lines += _format_row(name, row)
    lines.append("")
    met = [n for n, r in result["rows"].items() if r["verdict"]["met"]]
    lines.append(
        f"verdict: {len(met)} of {len(result['rows'])} row(s) meet their targets"
        + (f" ({', '.join(met)})" if met else "")
    )
    return "\n".join(lines)


def _format_row(name: str, row: dict) -> list[str]:
    v = row["verdict"]
    r = v["ratio"]
    ref_settings = row["reference_settings"]
    lines = [
        f"== {name}: {row['description']}",
        f"reference settings: {', '.join(f'{k}={v}' for k, v in ref_settings.items())}"
        + (" (fastest of the tried ones below)" if row.get("tuning") else " (given)"),
    ]
    for t in row.get("tuning", []):
        lines.append(
            f"   tried {', '.join(f'{k}={v}' for k, v in t['settings'].items())}: "
            f"{t['samples_per_s']:.2f} samples/s"
        )
    mllm_settings = row["rounds"][0]["mllm"]["settings"]
    lines.append(
        f"mllm train: attention {mllm_settings.get('attn')}, ZeRO-{mllm_settings.get('zero_stage')}, "
        f"{mllm_settings.get('optimizer')}, {mllm_settings.get('dataloader_workers')} dataloader worker(s), "
        f"{mllm_settings.get('collator')}"
    )
    lines.append(
        f"{'round':<7}{'ref samples/s':>14}{'mllm samples/s':>15}{'ratio':>8}{'ref RSS MiB':>12}"
        f"{'mllm RSS MiB':>13}{'ratio':>8}{'ref MFU':>9}{'mllm MFU':>9}"
    )
    for i, rd in enumerate(row["rounds"], 1):
        ref, ours = rd["reference"], rd["mllm"]
        lines.append(
            f"{i:<7}{ref['samples_per_s']:>14.2f}{ours['samples_per_s']:>15.2f}{rd['ratio']['samples_per_s']:>7.2f}×"
            f"{ref['peak_rss_mb']:>12,.0f}{ours['peak_rss_mb']:>13,.0f}{rd['ratio']['peak_rss']:>7.2f}×"
            f"{100 * ref['mfu']:>8.1f}%{100 * ours['mfu']:>8.1f}%"
        )
    warm = row.get("warm")
    if warm:
        lines.append(
            f"warm   {warm['reference']['samples_per_s']:>14.2f}{warm['mllm']['samples_per_s']:>15.2f}"
            f"{warm['ratio']['samples_per_s']:>7.2f}×{warm['reference']['peak_rss_mb']:>12,.0f}"
            f"{warm['mllm']['peak_rss_mb']:>13,.0f}{warm['ratio']['peak_rss']:>7.2f}×   (second run on the same "
            "data and output folder: caches warm; not in the headline)"
        )
    first = row["rounds"][0]
    lines.append(
        f"padding share ref {100 * first['reference']['padding_share']:.1f}% · mllm "
        f"{100 * first['mllm']['padding_share']:.1f}%; setup s ref {first['reference']['setup_s']:.1f} · mllm "
        f"{first['mllm']['setup_s']:.1f}; mean sample length ref {first['reference']['mean_length']:.0f} · mllm "
        f"{first['mllm']['mean_length']:.0f} tokens"
    )
    if "epoch_time" in r:
        lines.append(
            f"one epoch, start-up included (estimate): mllm / reference time {_range(r['epoch_time'])}"
        )
    lines.append(
        f"samples/s mllm / reference: median {_range(r['samples_per_s'])} (target ≥ "
        f"{v['target_samples_per_s_ratio']}×) {'MET' if v['speed_met'] else 'NOT MET'}; tokens/s "
        f"{_range(r['real_tokens_per_s'])}; MFU {_range(r['mfu'])}; peak RSS {_range(r['peak_rss'])} (target ≤ "
        f"{v['target_peak_rss_ratio']}×) {'MET' if v['rss_met'] else 'NOT MET'}"
    )
    lines.append("")
    return lines
