"""The Guided-OPD study (``python -m gopd_fast.study``): cells of size x method x seed, resumable, aggregated
into docs/study/summary.json, plots and tables. See ``gopd_fast/study/__main__.py``."""
