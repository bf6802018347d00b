"""``python -m gopd_fast.demo``: the demo's command line (``gopd_fast.demo.run.main``)."""
import sys

from gopd_fast.demo.run import main

main(sys.argv[1:])
