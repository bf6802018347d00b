"""WebShop, reimplemented in-process over the official data files: ``gopd_fast.envs.make("webshop", data_dir=...)``.

Modules: ``data`` (file formats, goals), ``search`` (BM25 via bm25s), ``pages`` (page states, text observations),
``reward`` (the published reward), ``env`` (the ``TextEnv``). Differences from the original: docs/envs.md.
"""
from gopd_fast.envs.webshop.env import WebShop, split_indices

__all__ = ["WebShop", "split_indices"]
