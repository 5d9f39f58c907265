"""Benchmark greedy generation: jaxinfer vs Hugging Face transformers (see `jaxinfer.bench`).

Usage: python scripts/bench_generate.py [--batch 1 8 32] [--prompt-len 128] [--new-tokens 128]
"""

import sys

from jaxinfer.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
