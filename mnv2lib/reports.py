"""``python -m mnv2lib.reports --profile quick --dataset auto``: the report runner
(``mnv2lib.workbook.report``)."""
import sys

from mnv2lib.workbook.report import main

if __name__ == "__main__":
    sys.exit(main())
