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
PROFILES = ("smoke", "quick", "gpu", "full")
KERNEL_NAME = "mnv2lib"
