"""The markdown table of ``benchmarks/accelerator.py``: one row per measurement, MFU against
the matmul peak measured in the same run, and a row naming every section that did not finish."""

from __future__ import annotations

from typing import Any

GIB = 2**30


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _mfu(flops_per_s: float | None, peak_tflops: float | None) -> str:
    if flops_per_s is None or not peak_tflops:
        return ""
    return f"{flops_per_s / (peak_tflops * 1e12):.1%}"


def _memory(nbytes: int | None) -> str:
    return _fmt(nbytes / GIB if nbytes else None, ".1f")


def _train_rows(name: str, r: dict[str, Any], peak: float | None) -> list[list[str]]:
    route = "; ".join(f"{x['start']}->{x['end']} at {x['ratio']}" for x in r["route"])
    label = f"train {r['model']}, batch {r['batch']}, {r['dtype']}"
    rows = []
    for i, (variant, v) in enumerate(r["variants"].items()):
        # Model FLOPs: three forward passes per image (forward + backward), analytic count, and
        # REPA's encoder, projector and loss in its variant.
        flops_per_s = 2 * v["step_gmacs_analytic"] * 1e9 / v["step_s_median"]
        notes = ""
        if variant == "routed":
            notes = (f"route {route}; routed/dense time {r['time_ratio_median_of_pairs']:.3f}, "
                     f"FLOP ratio {r['flop_ratio_analytic']:.3f}")
        elif variant == "repa":
            repa = r["repa"]
            notes = (f"route {route or 'none'}; {repa['encoder']}; REPA step time +{repa['overhead_measured']:.1%} "
                     f"(analytic FLOPs +{repa['overhead_analytic']:.1%}), encoder alone "
                     f"{repa['encoder_share_measured']:.1%} of the REPA step (analytic {repa['encoder_share_analytic']:.1%})")
        rows.append([f"{label}, {variant} ({name})", f"{v['images_per_s']:.1f}", _mfu(flops_per_s, peak),
                     _memory(r.get("peak_memory_bytes")) if i == 0 else "",
                     f"{v['compile_s']:.1f}", notes])
    return rows


def _sample_row(r: dict[str, Any], peak: float | None) -> list[str]:
    flops_per_s = r["gflops_per_image_analytic"] * 1e9 * r["images_per_s"]
    return [f"Heun {r['num_steps']} steps ({r['evaluations_per_image']} evaluations), {r['model']}, "
            f"batch {r['batch']}, {r['dtype']}", f"{r['images_per_s']:.2f}", _mfu(flops_per_s, peak),
            _memory(r.get("peak_memory_bytes")), f"{r['compile_s']:.1f}", f"guidance {r['guidance']}"]


def _evaluation_rows(r: dict[str, Any], peak_f32: float | None) -> list[list[str]]:
    names = {"inception": "FID Inception v3", "vae_decoder": "SD-VAE decoder"}
    return [[f"{names.get(k, k)}, input {'x'.join(map(str, n['input']))}, float32", f"{n['images_per_s']:.1f}",
             _mfu(n["gflops_per_image_xla"] * 1e9 * n["images_per_s"], peak_f32),
             _memory(r.get("peak_memory_bytes")) if i == 0 else "", f"{n['compile_s']:.1f}",
             "MFU against the float32 peak"] for i, (k, n) in enumerate(r["networks"].items())]


def _torch_row(r: dict[str, Any], sections: dict[str, Any]) -> list[str]:
    if "skipped" in r:
        return ["PyTorch reference (diffusers DiT)", "", "", "", "", r["skipped"]]
    notes = f"torch {r['torch']}, {'torch.compile' if r['compiled'] else 'eager'}, bf16 autocast"
    jax_train = sections.get("train_XL2", {}).get("result")
    if jax_train:
        ratio = jax_train["variants"]["dense"]["images_per_s"] / r["images_per_s"]
        notes += f"; tread_jax dense / PyTorch images/s: {ratio:.2f}"
    return [f"PyTorch diffusers DiT ({r['params'] / 1e6:.1f}M params), batch {r['batch']}, train step",
            f"{r['images_per_s']:.1f}", "", _memory(r.get("peak_memory_bytes")), f"{r['warmup_s']:.1f}", notes]


def _parity_row(r: dict[str, Any]) -> list[str]:
    verdict = "agree" if r["agree"] else "DISAGREE"
    return [f"digits trainer, {r['steps']} steps: device vs host CPU losses", "", "", "", "",
            f"{verdict}: max relative difference {r['max_rel_diff']:.2e} (step {r['max_rel_diff_step']}), "
            f"median {r['median_rel_diff']:.2e}, tolerance {r['tolerance']:.2e}"]


def markdown_table(summary: dict[str, Any]) -> str:
    """The report: a header line, the table, and the sections that did not finish."""
    sections = summary["sections"]
    peak_result = sections.get("peak", {}).get("result", {})
    peak, peak_f32 = peak_result.get("bfloat16_tflops"), peak_result.get("float32_tflops")
    rows: list[list[str]] = []
    unfinished = []
    for name, record in sections.items():
        result = record.get("result")
        if record["status"] not in ("ok", "skipped") or result is None:
            unfinished.append(f"- `{name}`: {record['status']}: {record.get('error', '')}")
            continue
        try:
            if name.startswith("train_"):
                rows += _train_rows(name, result, peak)
            elif name == "sample_XL2":
                rows.append(_sample_row(result, peak))
            elif name == "evaluation":
                rows += _evaluation_rows(result, peak_f32)
            elif name == "torch_reference":
                rows.append(_torch_row(result, sections))
            elif name == "digits_parity":
                rows.append(_parity_row(result))
        except (KeyError, TypeError, ZeroDivisionError) as error:
            # A script whose output changed must not cost the rest of the table.
            unfinished.append(f"- `{name}`: ran, but its result could not be tabulated "
                              f"({type(error).__name__}: {error}); see accelerator.json")
    device = peak_result.get("device", "device not recorded")
    peaks = (f"matmul peak {peak:.1f} TFLOP/s bfloat16, {peak_f32:.1f} float32 (measured in this run)"
             if peak and peak_f32 else "matmul peak not measured (no MFU)")
    header = (f"Device: {device}; jax {peak_result.get('jax', '?')}; {summary['date']}; {peaks}; "
              f"total {summary['total_s']:.0f} s"
              f"{' (--tiny: CPU smoke run, not a measurement)' if summary['tiny'] else ''}.\n\n")
    lines = ["| measurement | images/s | MFU | peak memory GiB | compile s | notes |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = header + "\n".join(lines) + "\n"
    if unfinished:
        text += "\nNot finished:\n" + "\n".join(unfinished) + "\n"
    return text
