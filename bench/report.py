"""Turn fused-linear-KL benchmark results into a markdown table.

    python bench/report.py rows.jsonl [bench-target.json ...] [--out results.md]

Inputs: the JSON-lines rows that bench/test_bench_fused_linear_kl.py appends to $GOPD_BENCH_JSONL, and/or
pytest-benchmark ``--benchmark-json`` files (their ``extra_info`` carries the same fields). Later duplicates of a
case replace earlier ones. Columns: median ms, useful TFLOP/s (6 N V Ds + 2 N V Dt per forward+backward), time over
the minimal-FLOP floor (useful FLOPs at the measured bf16 matmul rate, when the run measured it), peak extra memory
beyond inputs and gradients (MiB and % of the N x V fp32 logits), and each implementation's time over triton's.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

IMPL_ORDER = ["triton", "triton_one_stream", "triton_two_pass", "triton_atomic", "triton_logit_block", "triton_skip", "chunked", "torch", "torch_compile", "liger_jsd",
              "liger_jsd_loss", "cce"]
CASE_KEYS = ("N", "Ds", "Dt", "V", "objective", "inputs")  # rows before "inputs" existed: flat inputs


def load_rows(paths: list[Path]) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for path in paths:
        text = path.read_text()
        if path.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = []
            for bench in json.loads(text).get("benchmarks", []):
                stats = bench["stats"]
                items.append(dict(bench.get("extra_info", {}), median_ms=stats["median"] * 1e3,
                                  min_ms=stats["min"] * 1e3, rounds=stats["rounds"]))
        for item in items:
            if "impl" in item:
                item.setdefault("inputs", "flat")
                rows[tuple(item.get(k) for k in ("impl", *CASE_KEYS))] = item
    return list(rows.values())


def matmul_tflops(rows: list[dict]) -> float | None:
    for row in rows:
        if row["impl"] == "matmul":
            return row["flop_per_round"] / (row["median_ms"] / 1e3) / 1e12
    return None


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render(rows: list[dict]) -> str:
    rate = matmul_tflops(rows)
    cases = [r for r in rows if r["impl"] != "matmul"]
    device = next((r.get("device") for r in rows if r.get("device")), "unknown device")
    lines = [f"Device: {device}. bf16 dense matmul rate (8192^3 torch.mm): "
             f"{_fmt(rate, '.0f')} TFLOP/s." if rate else f"Device: {device}. Matmul rate not measured.", ""]
    lines += [("| N | Ds | Dt | objective | inputs | impl | median ms | useful TFLOP/s | x floor | peak extra MiB "
               "| % of N·V·4 | x triton |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    triton_ms = {tuple(r[k] for k in CASE_KEYS): r["median_ms"] for r in cases if r["impl"] == "triton"}

    def order(r):
        impl_rank = IMPL_ORDER.index(r["impl"]) if r["impl"] in IMPL_ORDER else len(IMPL_ORDER)
        return (r["N"], r["Ds"], r["Dt"], r["objective"], r["inputs"], impl_rank)

    for r in sorted(cases, key=order):
        seconds = r["median_ms"] / 1e3
        tflops = r["useful_tflop"] / seconds
        floor_x = seconds / (r["useful_tflop"] / rate) if rate else None
        extra = r.get("peak_extra_mib")
        extra_pct = 100.0 * extra / r["logits_fp32_mib"] if extra is not None else None
        ref = triton_ms.get(tuple(r[k] for k in CASE_KEYS))
        lines.append(
            f"| {r['N']} | {r['Ds']} | {r['Dt']} | {r['objective']} | {r['inputs']} | {r['impl']} | {r['median_ms']:.2f} "
            f"| {tflops:.1f} | {_fmt(floor_x, '.2f')} | {_fmt(extra, '.0f')} | {_fmt(extra_pct, '.2f')} "
            f"| {_fmt(r['median_ms'] / ref if ref else None, '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="rows .jsonl and/or pytest-benchmark .json files")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    table = render(load_rows([p for p in args.inputs if p.exists()]))
    if args.out:
        args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
