"""The demo wing: `make demo` (``python -m gopd_fast.demo``) and its tools (SFT, the failure-mode diagnostic,
plots). It sits above the library: it imports gopd_fast, and nothing in gopd_fast outside this package imports it."""
