"""BM25 product search with ``bm25s`` in place of the original's Pyserini/Lucene index.

Each product is indexed as the original's ``search_engine/convert_product_file_format.py`` builds a document:
title, description, first bullet point and "name: v1, v2" option text, lower-cased. BM25 uses Lucene's scoring
with Pyserini's default parameters (k1 = 0.9, b = 0.4) and English stop words; unlike Lucene's default analyzer
there is no Porter stemming (bm25s would need PyStemmer), so "shoes" does not match "shoe".
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gopd_fast.envs.webshop.data import Product

SEARCH_RETURN_N = 50  # results per search, as in the original


def product_document(p: Product) -> str:
    option_text = ", and ".join(f"{name}: {', '.join(values)}" for name, values in p.options.items())
    first_bullet = p.bullet_points[0] if p.bullet_points else ""
    return f"{p.title} {p.description} {first_bullet} {option_text}".lower()


class ProductSearch:
    def __init__(self, products: Sequence[Product], k1: float = 0.9, b: float = 0.4) -> None:
        import bm25s

        self._bm25s = bm25s
        self.asins = [p.asin for p in products]
        self.index = bm25s.BM25(k1=k1, b=b, method="lucene")
        tokens = bm25s.tokenize([product_document(p) for p in products], stopwords="en", show_progress=False)
        self.index.index(tokens, show_progress=False)

    def search(self, keywords: str, k: int = SEARCH_RETURN_N) -> list[str]:
        """ASINs of the top ``k`` products with a positive score, best first (ties: catalogue order)."""
        tokens = self._bm25s.tokenize([keywords.lower()], stopwords="en", show_progress=False,
                                      return_ids=False)[0]
        if not tokens:
            return []
        scores = np.asarray(self.index.get_scores(tokens))
        k = min(k, len(scores))
        top = np.arange(len(scores))
        if k < len(scores):  # the k best without sorting the whole catalogue; ties kept in catalogue order
            kth = np.partition(scores, len(scores) - k)[len(scores) - k]
            above = np.flatnonzero(scores > kth)
            top = np.concatenate([above, np.flatnonzero(scores == kth)[: k - len(above)]])
        top = top[np.lexsort((top, -scores[top]))]  # best first; equal scores in catalogue order
        return [self.asins[i] for i in top if scores[i] > 0]
