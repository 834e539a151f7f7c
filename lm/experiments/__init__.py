"""Many runs at once, and the figures made from them.

  sweep.py         a grid of config overrides, its points and result records.
  sweep_runner.py  runs a sweep's points as training processes, several at a time.
  scaling_fit.py   the compute frontier and its power-law fit.
  plotting.py      loss curves of several runs from their metrics.jsonl.
  bench.py         throughput, MFU, compile time and memory of a train step.
"""
