"""WebShop's page states and their text observations (the ``observation_mode="text"`` form: visible page texts
joined with " [SEP] ", as ReAct-style agents see them), and the clickables of each page.

Pages: search -> results (10 per page, "< Prev" / "Next >" / "Back to Search") -> item (options, "Description",
"Features", "Reviews", "Buy Now", "< Prev", "Back to Search") -> item sub-page ("< Prev", "Back to Search") ->
done (after "Buy Now"). Clickables are lower-cased, as the original text env matches ``click[...]`` arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from gopd_fast.envs.webshop.data import Goal, Product

PRODUCT_WINDOW = 10
BUY_NOW, NEXT_PAGE, PREV_PAGE, BACK_TO_SEARCH = "Buy Now", "Next >", "< Prev", "Back to Search"
SUB_PAGES = ("Description", "Features", "Reviews")
SEP = " [SEP] "


@dataclass
class Session:
    goal: Goal
    page: str = "search"                       # search | results | item | sub | done
    keywords: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)   # ASINs of the last search, best first
    page_num: int = 1
    asin: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    sub_page: str | None = None
    reward: float | None = None


def results_window(session: Session) -> list[str]:
    start = (session.page_num - 1) * PRODUCT_WINDOW
    return session.results[start:start + PRODUCT_WINDOW]


def clickables(session: Session, products: dict[str, Product]) -> list[str]:
    """The lower-cased clickable texts of the current page, in page order."""
    if session.page == "search":
        return ["search"]  # the search button: listed by the original, but click[search] does nothing
    if session.page == "results":
        out = [BACK_TO_SEARCH]
        if session.page_num > 1:
            out.append(PREV_PAGE)
        if session.page_num * PRODUCT_WINDOW < len(session.results):
            out.append(NEXT_PAGE)
        out += results_window(session)
        return [c.lower() for c in out]
    if session.page == "item":
        product = products[session.asin]  # type: ignore[index]
        values = [v for vs in product.options.values() for v in vs]
        return [c.lower() for c in [BACK_TO_SEARCH, PREV_PAGE, *values, *SUB_PAGES, BUY_NOW]]
    if session.page == "sub":
        return [BACK_TO_SEARCH.lower(), PREV_PAGE.lower()]
    return []


def render(session: Session, products: dict[str, Product]) -> str:
    instruction = session.goal.instruction_text
    if session.page == "search":
        return SEP.join(["WebShop", "Instruction:", instruction, "Search"])
    head = ["Instruction:", instruction, BACK_TO_SEARCH]
    if session.page == "results":
        parts = head + [f"Page {session.page_num} (Total results: {len(session.results)})"]
        if session.page_num > 1:
            parts.append(PREV_PAGE)
        if session.page_num * PRODUCT_WINDOW < len(session.results):
            parts.append(NEXT_PAGE)
        for asin in results_window(session):
            p = products[asin]
            parts += [asin, p.title, p.price_tag]
        return SEP.join(parts)
    product = products[session.asin]  # type: ignore[index]
    if session.page == "item":
        parts = head + [PREV_PAGE]
        for name, values in product.options.items():
            parts += [name, *values]
        parts += [product.title, f"Price: {product.price_tag}", f"Rating: {product.rating}", *SUB_PAGES, BUY_NOW]
        return SEP.join(parts)
    if session.page == "sub":
        parts = head + [PREV_PAGE]
        if session.sub_page == "Description":
            parts.append(product.description)
        elif session.sub_page == "Features":
            parts += product.bullet_points
        else:
            for r in product.reviews:
                parts += [str(r["title"]), str(r["score"]), str(r["body"])]
        return SEP.join(p for p in parts if p)
    # done
    chosen = ", ".join(f"{k}: {v}" for k, v in session.options.items()) or "none"
    return SEP.join(["Thank you for shopping with us!", "Purchased", session.asin or "", f"Options: {chosen}",
                     "Your score (min 0.0, max 1.0)", f"{session.reward:.4f}"])
