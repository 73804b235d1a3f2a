"""Plot a saved benchmark run: throughput (GB/s) against C, one line per implementation.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/plot.py bench.json -o bench.png

One panel per dtype (and per L when several levels were measured). Throughput uses the
bytes model stored by the suite in each case's ``extra_info`` (read s and t_ℓ, write the
gradient), so the lines compare implementations directly.
"""

import argparse
import json
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

# Baselines drawn dashed, in a fixed order, so the package's backends stand out.
BASELINE_STYLE = {"eager_moekd": "--", "compiled_moekd": "--", "eager_classic_kd": ":", "liger_classic_kd": ":"}


def load_series(path):
    """{(dtype, levels): {impl: [(C, GB/s), ...]}} from a pytest-benchmark JSON file."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    series = defaultdict(lambda: defaultdict(list))
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "gbps" not in info:
            continue
        series[(info["dtype"], info.get("levels", 1))][info["impl"]].append((info["classes"], info["gbps"]))
    return series, data.get("machine_info", {})


def plot(series, machine, output, title=None):
    panels = sorted(series)
    if not panels:
        raise SystemExit("no benchmark in the file has throughput data (was it written by benchmarks/?)")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (dtype, levels) in zip(axes[0], panels):
        impls = series[(dtype, levels)]
        for impl in sorted(impls, key=lambda n: (n not in BASELINE_STYLE, n)):
            points = sorted(impls[impl])
            ax.plot([c for c, _ in points], [g for _, g in points], marker="o",
                    linestyle=BASELINE_STYLE.get(impl, "-"), label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("classes C")
        ax.set_ylabel("GB/s (read s, t; write grad)")
        ax.set_title(f"{dtype}" + (f", L={levels}" if levels != 1 else "") + ", fwd+bwd")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    cpu = machine.get("cpu", {}).get("brand_raw") or machine.get("processor") or ""
    fig.suptitle(title or f"MoE-KD fwd+bwd throughput {('— ' + cpu) if cpu else ''}")
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="file written by pytest --benchmark-json=...")
    parser.add_argument("-o", "--output", default="benchmark.png", help="PNG to write (default benchmark.png)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    series, machine = load_series(args.json)
    plot(series, machine, args.output, args.title)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
