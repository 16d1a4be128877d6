"""Benchmarks (`ppllava-edge bench`): runner.py (variants, timed loop), stats.py, hardware.py (bandwidth, GEMM,
FLOP counts, efficiencies), report.py (markdown / JSON / CSV / PNG, targets). numpy + runtime only; torch is
imported lazily by the `--backend torch` runner, matplotlib by the plot."""
