"""Analyses behind the notebooks: computations on models and run records (figures live in
``mnv2lib.figures``). One module per notebook topic."""
