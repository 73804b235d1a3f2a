"""Command line: ``python -m moekd_kernels demo|bench [options]``."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moekd_kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import benchmarking, demo

    demo.add_arguments(sub.add_parser("demo", help="distil students on scikit-learn's digits: CE vs KD vs MoE-KD"))
    benchmarking.add_arguments(sub.add_parser("bench", help="quick fwd+bwd speed table against the baselines"))
    args = parser.parse_args(argv)
    runner = {"demo": demo.run, "bench": benchmarking.run}[args.command]
    return int(runner(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
