"""WebShop's catalogue and goals, read from the official data files (princeton-nlp/WebShop ``data/``).

Files and the fields read (everything else is ignored):

``items_shuffle.json`` (or ``items_shuffle_1000.json``): a list of products, each with
    ``asin`` (str; "nan" or longer than 10 characters: skipped; duplicates: first kept), ``name`` (title),
    ``full_description`` (str), ``small_description`` (str or list of str: the "Features" bullet points),
    ``pricing`` (str such as "$12.99" or "$10.00 - $20.00"; empty: $100.0), ``customization_options``
    (``{option name: [{"value": str, "image": str|None}, ...]}`` or null), ``images`` (list; first = main image),
    ``category``, ``query``, ``product_category`` (breadcrumb "A › B › C").
``items_ins_v2.json`` (or ``items_ins_v2_1000.json``): ``{asin: {"attributes": [...], "instruction": str,
    "instruction_attributes": [...]}}`` - product attributes, and the synthetic goals.
``items_human_ins.json``: ``{asin: [{"instruction": str, "instruction_attributes": [...],
    "instruction_options": [...]}, ...]}`` - the 12,087 human-written goals.
``reviews.json`` (optional): ``[{"asin", "average_rating", "reviews": [{"title", "score" or "stars",
    "body" or "review"}]}]``.

Normalisation follows the original ``load_products``: option names and values lower-cased with "/" -> " | ",
prices parsed from the pricing string, attributes default to ``["DUMMY_ATTR"]``. Goal construction follows
``get_human_goals`` / ``get_synthetic_goals``, then the original's fixed shuffle (``random.seed(233)``).
"""
from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

PRICE_STEPS = [10.0 * i for i in range(1, 100)]  # the goal price bounds: multiples of $10 up to $990
GOAL_SHUFFLE_SEED = 233                           # the original shuffles the goal list with this seed


@dataclass
class Product:
    asin: str
    title: str
    description: str
    bullet_points: list[str]
    price_tag: str                 # "$12.99" or "$10.0 to $20.0", as shown on pages
    pricing: list[float]           # one price or a [low, high] range
    options: dict[str, list[str]]  # option name -> values, lower-cased
    attributes: list[str]
    category: str
    query: str
    product_category: str
    rating: Any = "N.A."
    reviews: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Goal:
    asin: str
    instruction_text: str
    attributes: list[str]
    goal_options: list[str] | dict[str, str]
    price_upper: float
    query: str
    category: str
    product_category: str
    name: str                      # the target product's title (type matching)


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _first_existing(data_dir: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (data_dir / name).is_file():
            return data_dir / name
    raise FileNotFoundError(
        f"WebShop {what} not found in {data_dir}: expected one of {', '.join(names)}. Get the official files "
        "with the princeton-nlp/WebShop repository's setup.sh (data/), on a machine with internet access, and pass "
        "data_dir=<that folder> (or set WEBSHOP_DATA)."
    )


def parse_pricing(pricing: str | None) -> tuple[list[float], str]:
    """"$10.00 - $20.00" -> ([10.0, 20.0], "$10.0 to $20.0"); missing -> ([100.0], "$100.0")."""
    if not pricing:
        return [100.0], "$100.0"
    values = [float(Decimal(re.sub(r"[^\d.]", "", part))) for part in pricing.split("$")[1:]
              if re.sub(r"[^\d.]", "", part)]
    if not values:
        return [100.0], "$100.0"
    if len(values) == 1:
        return values, f"${values[0]}"
    return values[:2], f"${values[0]} to ${values[1]}"


def load_products(data_dir: Path, num_products: int | None = None) -> list[Product]:
    items = _read_json(_first_existing(data_dir, ("items_shuffle.json", "items_shuffle_1000.json"), "catalogue"))
    attrs = _read_json(_first_existing(data_dir, ("items_ins_v2.json", "items_ins_v2_1000.json"), "attributes"))
    reviews: dict[str, dict[str, Any]] = {}
    if (data_dir / "reviews.json").is_file():
        reviews = {r["asin"]: r for r in _read_json(data_dir / "reviews.json")}
    if num_products is not None:
        items = items[:num_products]  # items_shuffle is pre-shuffled, so a prefix is a random subset
    products, seen = [], set()
    for p in items:
        asin = p["asin"]
        if asin == "nan" or len(asin) > 10 or asin in seen:
            continue
        seen.add(asin)
        options: dict[str, list[str]] = {}
        for name, contents in (p.get("customization_options") or {}).items():
            if contents is None:
                continue
            options[name.lower()] = [c["value"].strip().replace("/", " | ").lower() for c in contents]
        pricing, price_tag = parse_pricing(p.get("pricing"))
        small = p.get("small_description") or []
        review = reviews.get(asin, {})
        products.append(Product(
            asin=asin,
            title=p["name"],
            description=p.get("full_description") or "",
            bullet_points=small if isinstance(small, list) else [small],
            price_tag=price_tag,
            pricing=pricing,
            options=options,
            attributes=(attrs.get(asin) or {}).get("attributes") or ["DUMMY_ATTR"],
            category=p.get("category", ""),
            query=p.get("query", "").lower().strip(),
            product_category=p.get("product_category", ""),
            rating=review.get("average_rating", "N.A."),
            reviews=[{"title": r.get("title", ""), "score": r.get("score", r.get("stars")),
                      "body": r.get("body", r.get("review", ""))} for r in review.get("reviews", [])],
        ))
    return products


def product_prices(products: list[Product], rng: random.Random) -> dict[str, float]:
    """One fixed price per product: a price range is sampled uniformly once (as the original does)."""
    prices = {}
    for p in products:
        prices[p.asin] = p.pricing[0] if len(p.pricing) == 1 else rng.uniform(*p.pricing[:2])
    return prices


def _price_bound(price: float, rng: random.Random) -> tuple[float, str]:
    above = [p for p in PRICE_STEPS if p > price][:4]
    if len(above) >= 2:
        _, upper = sorted(rng.sample(above, 2))
        return upper, f", and price lower than {upper:.2f} dollars"
    return 1_000_000.0, ""


def load_goals(data_dir: Path, products: list[Product], prices: dict[str, float], rng: random.Random,
               human: bool = True) -> list[Goal]:
    """The goal list in the original order: built per product, then shuffled with seed 233."""
    goals: list[Goal] = []
    if human:
        human_ins = _read_json(_first_existing(data_dir, ("items_human_ins.json",), "human instructions"))
        for p in products:
            for ins in human_ins.get(p.asin, []):
                if not ins.get("instruction_attributes"):
                    continue  # the original skips goals without attributes
                upper, price_text = _price_bound(prices[p.asin], rng)
                goals.append(Goal(p.asin, ins["instruction"].strip(".") + price_text, ins["instruction_attributes"],
                                  ins.get("instruction_options") or [], upper, p.query, p.category,
                                  p.product_category, p.title))
    else:
        attrs = _read_json(_first_existing(data_dir, ("items_ins_v2.json", "items_ins_v2_1000.json"), "attributes"))
        for p in products:
            entry = attrs.get(p.asin) or {}
            if not entry.get("instruction"):
                continue
            upper, price_text = _price_bound(prices[p.asin], rng)
            names = sorted(p.options)
            for combo in itertools.product(*(p.options[n] for n in names)):
                chosen = dict(zip(names, combo))
                option_text = ", and ".join(f"{k}: {v}" for k, v in chosen.items())
                option_text = f" with {option_text}" if option_text else ""
                goals.append(Goal(p.asin, f"{entry['instruction']}{option_text}{price_text}",
                                  entry.get("instruction_attributes") or [], chosen, upper, p.query, p.category,
                                  p.product_category, p.title))
    random.Random(GOAL_SHUFFLE_SEED).shuffle(goals)
    return goals
