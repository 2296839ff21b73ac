"""Benchmarks: `python -m unimodal.bench {train,sample,tokenizer,data} ...`.

Every benchmark first measures this machine's matmul peak, so each figure is also reported as a
fraction of a peak measured in the same run (absolute seconds on a shared machine mean little).
"""
