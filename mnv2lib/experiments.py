"""``python -m mnv2lib.experiments plan|run|train|ablation|ladder|decomposition``: the results store's command line
(``mnv2lib.workbook.cli``). The notebooks' API is ``mnv2lib.runs.api``."""
from mnv2lib.workbook.cli import main

if __name__ == "__main__":
    main()
