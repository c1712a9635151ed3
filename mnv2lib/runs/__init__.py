"""Runs: profiles (budgets), run specs and keys, the results store, running one run, the executors that
train many, and the notebooks' API over them (``mnv2lib.runs.api``)."""
