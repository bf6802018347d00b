"""The Guided-OPD study (``python -m gopd_fast.demo.study``), part of the demo wing: cells of size x method x seed,
resumable, aggregated into docs/study/summary.json, plots and tables. See ``gopd_fast/demo/study/__main__.py``."""
