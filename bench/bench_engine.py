"""Speed benchmark of the EXAONE-4.0-1.2B shape against transformers; see bench/README.md.

    python bench/bench_engine.py [--dtypes float32,bfloat16] [--layers N] [--skip-hf] [--json out.json]

The same as `exaone bench`: the code lives in exaone/commands/bench.py so the CLI runs it too.
"""
import sys

from exaone.commands.bench import main

if __name__ == "__main__":
    sys.exit(main())
