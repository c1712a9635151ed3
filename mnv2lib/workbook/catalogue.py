"""The workbook's notebooks, in order, and the profiles `make reports` accepts."""
from __future__ import annotations

# The workbook's sequence; notebooks not written yet are reported as missing.
NOTEBOOK_SEQUENCE = (
    "01_activation_study",
    "02_triplet_attention",
    "03_cnsn_distributions",
    "04_ablations",
    "05_mobilenet_families",
    "06_mobilenetv2_design",
    "07_deployment",
    "08_applications",
)
# Notebooks that time nothing (every cost they show comes from the runs' records): `make reports` executes
# them side by side; the others time latencies and run alone, one after another.
TIMES_NOTHING = frozenset({"01_activation_study", "02_triplet_attention", "03_cnsn_distributions", "04_ablations"})
PROFILES = ("smoke", "quick", "gpu", "full")
KERNEL_NAME = "mnv2lib"
