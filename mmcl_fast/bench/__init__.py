"""The benchmark suite behind `mmcl-fast bench` and `mmcl-fast info`.

impls.py (what is compared: a registry of losses and their implementations), measure.py (one record: time and
peak memory in an isolated process), machine.py (hardware, versions, matmul ceiling), runner.py (the sweep and
results.json), report.py (terminal table), plot.py (PNGs), cli.py / info.py (the subcommands).
"""
