"""Generated prose: the sentences each notebook renders, computed from its numbers (one module per
analysis module; the computation stays in ``mnv2lib.analysis``)."""
