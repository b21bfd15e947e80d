"""The rate this machine multiplies matrices at: the denominator of the FLOP floor (benchmarks/README.md).

Times ``a @ b`` for the shapes of the benchmark models' linear layers (SmolLM2's 576 x 1536 MLP over
4096 rows) and one square product, in fp32 and bf16, with the benchmark's thread count, and prints the
median rate of each:

    python benchmarks/matmul_rate.py [--threads 2] [--repeats 5] [--shapes 4096x576x1536,2048x2048x2048]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = ((4096, 576, 1536), (4096, 1536, 576), (2048, 2048, 2048))  # (m, k, n): [m, k] @ [k, n]


def rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    """Median FLOP/s of ``[m, k] @ [k, n]`` over ``repeats`` timings after two untimed calls."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(2):
        a @ b
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(seconds)


def shapes_list(text: str) -> tuple[tuple[int, int, int], ...]:
    try:
        shapes = tuple(tuple(int(d) for d in shape.split("x")) for shape in text.split(","))
    except ValueError:
        shapes = ()
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"shapes look like 4096x576x1536,2048x2048x2048, got {text!r}")
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", type=shapes_list, default=SHAPES,
                        help="MxKxN,... ([M, K] @ [K, N]); default: " + ",".join("x".join(map(str, s)) for s in SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for dtype in (torch.float32, torch.bfloat16):
        rates = [rate(*shape, dtype, args.repeats) for shape in args.shapes]
        shapes = ", ".join(f"{m}x{k}x{n}: {r / 1e9:.0f}" for (m, k, n), r in zip(args.shapes, rates))
        print(f"{str(dtype).removeprefix('torch.'):9s} median {statistics.median(rates) / 1e9:6.0f} GFLOP/s ({shapes})")


if __name__ == "__main__":
    main()
