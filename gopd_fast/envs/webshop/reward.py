"""WebShop's published reward (Yao et al., 2022, section 3.1 and ``engine/goal.py``):

    reward = r_type * (n_matched_attributes + n_matched_options + [price <= price_upper])
                    / (n_goal_attributes + n_goal_options + 1)

``r_type`` is 1 when the purchased product has the goal's type, lowered to 0.5 / 0.1 / 0 as the query, the
category breadcrumb and the title nouns agree less. Attribute and option matches use a fuzzy token-set ratio > 85,
else a substring test against the title, features and description; "size" options must match exactly.

The original's fuzzy matcher, thefuzz's ``token_set_ratio``, is computed by rapidfuzz (the library under thefuzz)
with thefuzz's preprocessing. ``title_nouns`` uses spaCy's ``en_core_web_lg`` tagger when that model is installed (as
the original) and a content-word heuristic otherwise (differences are listed in docs/envs.md).
"""
from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass
from typing import Any

from rapidfuzz import fuzz, utils

from gopd_fast.envs.webshop.data import Goal, Product

EXACT_MATCH_OPTIONS = ("size",)
FUZZY_THRESHOLD = 85

# Colour words: an option value that contains one is reduced to it before matching (the original's
# normalize_color), so "navy blue | white" matches a goal's "navy blue".
COLORS = (
    "alabaster", "apricot", "aqua", "ash", "beige", "black", "blue", "blush", "bronze", "brown", "burgundy",
    "camel", "champagne", "charcoal", "chocolate", "coffee", "copper", "coral", "cream", "denim", "emerald",
    "fuchsia", "gold", "gray", "green", "grey", "ivory", "khaki", "lavender", "lilac", "maroon", "mint",
    "multicolor", "mustard", "navy", "nude", "olive", "orange", "peach", "pink", "plum", "purple", "red",
    "rose", "rust", "sand", "silver", "tan", "taupe", "teal", "turquoise", "violet", "white", "wine", "yellow",
)
_STOPWORDS = frozenset(["a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "has", "have", "in", "is", "it", "its", "of", "on", "or", "that", "the", "this", "to", "with", "without", "your", "you", "pack", "set", "pcs", "piece", "pieces", "count", "inch", "inches", "oz", "ounce", "ounces", "lb", "lbs", "x"])


@dataclass(frozen=True)
class RewardInfo:
    reward: float
    r_type: float
    r_attribute: float
    r_option: float | None
    r_price: bool | None
    query_match: bool
    category_match: bool
    title_score: float


# thefuzz's force_ascii (on by default): code points 128-255 are deleted before its default processing.
_LATIN1_HIGH = dict.fromkeys(range(128, 256))


def token_set_ratio(a: str, b: str) -> int:
    """thefuzz.fuzz.token_set_ratio(a, b) with its defaults, as the original calls it: the sorted shared tokens
    compared with each side's sorted remainder by the Indel ratio, best of three, rounded to an int."""
    score = fuzz.token_set_ratio(a.translate(_LATIN1_HIGH), b.translate(_LATIN1_HIGH),
                                 processor=utils.default_process)
    return round(score)


def normalize_color(value: str) -> str:
    for color in COLORS:
        if color in value:
            return color
    return value


@functools.lru_cache(maxsize=1)
def _spacy_model() -> Any:
    # Look for the model package before importing spaCy: the import alone takes seconds.
    if importlib.util.find_spec("en_core_web_lg") is None:
        return None
    import spacy

    return spacy.load("en_core_web_lg")


@functools.lru_cache(maxsize=65536)
def title_nouns(title: str) -> tuple[str, ...]:
    """Lower-cased nouns of a product title (spaCy NOUN/PROPN when available, else content words)."""
    nlp = _spacy_model()
    if nlp is not None:
        return tuple(t.text.lower() for t in nlp(title) if t.pos_ in ("PNOUN", "NOUN", "PROPN"))
    words = re.findall(r"[a-zA-Z][a-zA-Z'-]*", title.lower())
    return tuple(w for w in words if w not in _STOPWORDS and len(w) > 1)


def type_reward(product: Product, goal: Goal) -> tuple[float, bool, bool, float]:
    query_match = product.query == goal.query
    bought = {x.strip() for x in product.product_category.split("›")}
    wanted = {x.strip() for x in goal.product_category.split("›")}
    category_match = len(bought & wanted) >= 2
    bought_nouns, wanted_nouns = set(title_nouns(product.title)), title_nouns(goal.name)
    title_score = 0.2 if not wanted_nouns else len(bought_nouns & set(wanted_nouns)) / len(wanted_nouns)
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return r_type, query_match, category_match, title_score


def _in_text(needle: str, product: Product) -> bool:
    return (needle in product.title.lower() or needle in " ".join(product.bullet_points).lower()
            or needle in product.description.lower())


def attribute_matches(product: Product, goal: Goal) -> int:
    n = 0
    for wanted in goal.attributes:
        if any(token_set_ratio(have, wanted) > FUZZY_THRESHOLD for have in product.attributes) or \
                _in_text(wanted, product):
            n += 1
    return n


def option_matches(product: Product, goal_options: list[str], chosen: dict[str, str]) -> int:
    goal_values = [normalize_color(o) for o in goal_options]
    n = 0
    for name, value in chosen.items():
        value = normalize_color(value)
        if name.lower() in EXACT_MATCH_OPTIONS:
            matched = value in goal_values
        else:
            matched = any(token_set_ratio(g, value) > FUZZY_THRESHOLD for g in goal_values)
        if matched or _in_text(value, product):
            n += 1
    return n


def reward(product: Product, goal: Goal, price: float, chosen_options: dict[str, str]) -> RewardInfo:
    """The reward in [0, 1] for buying ``product`` at ``price`` with ``chosen_options`` under ``goal``."""
    r_type, query_match, category_match, title_score = type_reward(product, goal)
    goal_options = list(goal.goal_options.values()) if isinstance(goal.goal_options, dict) else list(goal.goal_options)
    r_price = price <= goal.price_upper if goal.price_upper > 0 else None
    n_attr = attribute_matches(product, goal)
    n_opt = option_matches(product, goal_options, chosen_options)
    total = (n_attr + n_opt + int(bool(r_price))) / (len(goal.attributes) + len(goal_options) + 1) * r_type
    return RewardInfo(
        reward=total,
        r_type=r_type,
        r_attribute=n_attr / len(goal.attributes) if goal.attributes else 0.0,
        r_option=n_opt / len(goal_options) if goal_options else None,
        r_price=r_price,
        query_match=query_match,
        category_match=category_match,
        title_score=title_score,
    )
