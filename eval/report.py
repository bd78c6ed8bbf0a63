"""Write RUN_DIR/report/report.md with PNG plots of a run (the same as ``pcl-scale report``).

python eval/report.py RUN_DIR
"""

import sys

from pcl_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
