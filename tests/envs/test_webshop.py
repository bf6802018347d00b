"""WebShop reimplementation on a small catalogue written in the official data formats."""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest

pytest.importorskip("bm25s", reason="WebShop search needs bm25s")

from gopd_fast.envs import make
from gopd_fast.envs.webshop import split_indices
from gopd_fast.envs.webshop.data import parse_pricing
from gopd_fast.envs.webshop.reward import token_set_ratio

COLORS = ["red", "navy blue", "black", "white", "green", "grey", "pink", "yellow", "brown", "purple", "orange", "teal"]


def _item(asin, name, price, options=None, query="cotton t-shirt", category="fashion",
          product_category="Clothing › Men › Shirts › T-Shirts", desc="", bullets=None):
    return {
        "asin": asin, "name": name, "full_description": desc or f"{name}. Soft cotton.",
        "small_description": bullets if bullets is not None else [f"{name} feature one", "machine wash"],
        "pricing": price, "images": [f"https://img/{asin}.jpg"], "category": category, "query": query,
        "product_category": product_category,
        "customization_options": options, "brand": "ignored", "seller_id": "ignored",
    }


def write_catalogue(root: Path) -> Path:
    items = [
        _item(f"B00TEE{i:04d}", f"Men's Cotton Crew T-Shirt Style {i} {COLORS[i]}", f"${10 + i}.99",
              {"Color": [{"value": COLORS[i].title(), "image": None}, {"value": "Light/Dark", "image": None}],
               "Size": [{"value": "Small", "image": None}, {"value": "X-Large", "image": None}]})
        for i in range(12)
    ]
    items += [
        _item("B00LAMP001", "LED Desk Lamp with USB Charging Port", "$25.00 - $35.00",
              {"color": [{"value": "Silver", "image": None}, {"value": "Black", "image": None}]},
              query="desk lamp", category="home", product_category="Home › Lighting › Lamps › Desk Lamps",
              bullets="Dimmable, 5 brightness levels"),
        _item("B00SOAP001", "Organic Lavender Bar Soap", "", None, query="bar soap", category="beauty",
              product_category="Beauty › Bath › Soaps"),
        _item("nan", "broken row", "$1.00"),
        _item("B00TEE0000", "duplicate asin, dropped", "$1.00"),
        _item("B00TOOLONG00", "asin longer than 10 characters, dropped", "$1.00"),
    ]
    attrs = {f"B00TEE{i:04d}": {"attributes": ["machine wash", "short sleeve"]} for i in range(12)}
    attrs["B00LAMP001"] = {"attributes": ["dimmable", "usb charging"], "instruction": "i want a desk lamp",
                           "instruction_attributes": ["usb charging"]}
    human = {
        "B00TEE0003": [{"instruction": "i need a white men's cotton t-shirt in x-large, machine wash.",
                        "instruction_attributes": ["machine wash"], "instruction_options": ["white", "x-large"]}],
        "B00LAMP001": [{"instruction": "find a dimmable led desk lamp with usb charging port in black",
                        "instruction_attributes": ["dimmable", "usb charging"], "instruction_options": ["black"]},
                       {"instruction": "a lamp without attributes is skipped", "instruction_attributes": [],
                        "instruction_options": []}],
        "B00SOAP001": [{"instruction": "organic lavender bar soap", "instruction_attributes": ["organic"],
                        "instruction_options": []}],
    }
    reviews = [{"asin": "B00LAMP001", "average_rating": 4.5,
                "reviews": [{"title": "Bright", "stars": 5, "review": "Great lamp for the desk."}]}]
    data = root / "webshop_data"
    data.mkdir()
    for name, obj in [("items_shuffle_1000.json", items), ("items_ins_v2_1000.json", attrs),
                      ("items_human_ins.json", human), ("reviews.json", reviews)]:
        (data / name).write_text(json.dumps(obj))
    return data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_catalogue(tmp_path_factory.mktemp("ws"))


@pytest.fixture(scope="module")
def env(data_dir):
    return make("webshop", data_dir=data_dir, max_turns=15)


def _goal_task(env, asin):
    return next(f"fixed_{i}" for i, g in enumerate(env.catalogue.goals) if g.asin == asin)


def test_catalogue_fields_follow_the_original_loader(env):
    products = env.catalogue.products
    assert len(products) == 14 and "nan" not in products and "B00TOOLONG00" not in products
    tee = products["B00TEE0000"]
    assert tee.title.startswith("Men's Cotton Crew T-Shirt Style 0")  # the first of the duplicate asins wins
    assert tee.options == {"color": ["red", "light | dark"], "size": ["small", "x-large"]}
    assert tee.pricing == [10.99] and tee.price_tag == "$10.99" and tee.attributes == ["machine wash", "short sleeve"]
    lamp = products["B00LAMP001"]
    assert lamp.pricing == [25.0, 35.0] and lamp.price_tag == "$25.0 to $35.0"
    assert lamp.bullet_points == ["Dimmable, 5 brightness levels"] and lamp.rating == 4.5
    assert lamp.reviews == [{"title": "Bright", "score": 5, "body": "Great lamp for the desk."}]
    assert products["B00SOAP001"].pricing == [100.0] and products["B00SOAP001"].attributes == ["DUMMY_ATTR"]
    assert 25.0 <= env.catalogue.prices["B00LAMP001"] <= 35.0
    assert parse_pricing("$1,299.00") == ([1299.0], "$1299.0")


def test_goals_are_in_the_original_order(env):
    # The original appends goals product by product, skips goals without attributes, then random.seed(233) +
    # random.shuffle (the global RNG): replay that independently.
    expected = [("B00TEE0003", "i need a white men's cotton t-shirt in x-large, machine wash"),
                ("B00LAMP001", "find a dimmable led desk lamp with usb charging port in black"),
                ("B00SOAP001", "organic lavender bar soap")]
    state = random.getstate()
    try:
        random.seed(233)
        random.shuffle(expected)
    finally:
        random.setstate(state)
    goals = env.catalogue.goals
    assert [(g.asin, re.sub(r", and price lower than .*", "", g.instruction_text)) for g in goals] == expected
    for g in goals:  # price bounds: two of the four $10 steps above the price, the higher one kept
        price = env.catalogue.prices[g.asin]
        assert g.price_upper in [p for p in (10.0 * i for i in range(1, 100)) if p > price][1:4]
        assert g.instruction_text.endswith(f", and price lower than {g.price_upper:.2f} dollars")


def test_split_ranges():
    s = split_indices(12087)
    assert s["test"] == list(range(500)) and s["validation"] == list(range(500, 1500))
    assert s["eval"] == list(range(4096, 4196))
    assert len(s["train"]) == 12087 - 1500 - 100 and not set(s["train"]) & set(s["eval"])
    assert split_indices(3) == {"train": [], "validation": [], "test": [0, 1, 2], "eval": []}


def test_tasks_and_bad_task_ids(env):
    assert env.tasks("test") == ["fixed_0", "fixed_1", "fixed_2"] and env.tasks("eval") == []
    with pytest.raises(ValueError, match="unknown split"):
        env.tasks("dev")
    for bad in ["3", "fixed_x", "fixed_3", "session_1"]:
        with pytest.raises(ValueError):
            env.reset(bad)
    with pytest.raises(TypeError):
        env.reset(0)


def _naive_bm25(docs, query, k1=0.9, b=0.4):
    """Lucene BM25 in float64 on the same tokenisation (2+ character words, English stop words dropped)."""
    from bm25s.stopwords import STOPWORDS_EN

    def tok(text):
        return [w for w in re.findall(r"(?u)\b\w\w+\b", text.lower()) if w not in STOPWORDS_EN]

    corpus = [tok(d) for d in docs]
    avgdl = sum(map(len, corpus)) / len(corpus)
    scores = []
    for doc in corpus:
        s = 0.0
        for term in set(tok(query)):
            df = sum(term in d for d in corpus)
            if df == 0:
                continue
            tf = doc.count(term)
            idf = math.log(1 + (len(corpus) - df + 0.5) / (df + 0.5))
            s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        scores.append(s)
    return scores


@pytest.mark.parametrize("query", ["desk lamp usb", "cotton t-shirt navy blue", "lavender soap", "style 7 green"])
def test_search_ranks_like_lucene_bm25(env, query):
    from gopd_fast.envs.webshop.search import product_document

    products = list(env.catalogue.products.values())
    ref = _naive_bm25([product_document(p) for p in products], query)
    expected = [p.asin for s, _, p in sorted(((-s, i, p) for i, (s, p) in enumerate(zip(ref, products))))
                if -s > 0]
    got = env.catalogue.search.search(query)
    assert got == expected[:50]
    assert env.catalogue.search.search("zzzz qqqq") == []


def test_page_flow_pagination_options_and_sub_pages(env):
    first = env.reset(_goal_task(env, "B00TEE0003"))
    assert first.observation.startswith("WebShop [SEP] Instruction: [SEP] i need a white")
    assert first.observation.endswith("[SEP] Search") and first.info["has_search_bar"]
    res = env.step("search[Crew T-Shirt]")
    assert res.observation.split(" [SEP] ")[2:5] == ["Back to Search", "Page 1 (Total results: 12)", "Next >"]
    assert "click[next >]" in res.admissible_actions and "click[< prev]" not in res.admissible_actions
    page2 = env.step("click[Next >]")
    assert "Page 2 (Total results: 12)" in page2.observation and "click[< prev]" in page2.admissible_actions
    assert len([a for a in page2.admissible_actions if a.startswith("click[b00")]) == 2
    env.step("click[< prev]")
    item = env.step("click[b00tee0003]")
    assert item.info["page"] == "item"
    assert "[SEP] color [SEP] white [SEP] light | dark [SEP] size [SEP] small [SEP] x-large [SEP]" in item.observation
    assert item.observation.endswith("Price: $13.99 [SEP] Rating: N.A. [SEP] Description [SEP] Features "
                                     "[SEP] Reviews [SEP] Buy Now")
    env.step("click[x-large]")
    assert env.session.options == {"size": "x-large"}
    feats = env.step("click[features]")
    assert feats.observation.endswith("< Prev [SEP] Men's Cotton Crew T-Shirt Style 3 white feature one "
                                      "[SEP] machine wash")
    assert feats.admissible_actions == ("click[back to search]", "click[< prev]")
    back = env.step("click[< Prev]")
    assert back.info["page"] == "item" and env.session.options == {"size": "x-large"}
    results = env.step("click[< prev]")
    assert results.info["page"] == "results" and env.session.options == {}
    assert env.step("click[back to search]").observation == first.observation


def test_invalid_actions_leave_the_page_unchanged(env):
    env.reset("fixed_0")
    before = env.step("search[lamp]")
    for bad in ["buy it", "click[b00tee0005]", "click[search]", "click[]", "search[]", "jump[now]"]:
        step = env.step(bad)
        assert step.observation == before.observation and step.info["invalid_action"] and not step.done
    with pytest.raises(TypeError):
        env.step(None)


def test_reward_matches_a_hand_computed_case(env):
    # Goal: white, x-large tee with attribute "machine wash". Buying the *red* tee in size small:
    # attributes 1/1 (in its attribute list), options: "small" is not a goal option and does not occur in its
    # texts (0), price fits, type matches (same query) -> (1 + 0 + 1) / (1 + 2 + 1) = 0.5.
    env.reset(_goal_task(env, "B00TEE0003"))
    env.step("search[cotton crew t-shirt style 0 red]")
    env.step("click[b00tee0000]")
    env.step("click[small]")
    done = env.step("click[buy now]")
    assert done.done and not done.success and done.score == pytest.approx(50.0)
    info = done.info["reward_info"]
    assert info.r_type == 1.0 and info.r_option == 0.0 and info.r_attribute == 1.0 and info.r_price
    assert done.observation.startswith("Thank you for shopping with us!")
    with pytest.raises(RuntimeError, match="after the episode is done"):
        env.step("click[buy now]")


def test_a_wrong_product_type_scores_zero(env):
    env.reset(_goal_task(env, "B00SOAP001"))
    env.step("search[desk lamp]")
    env.step("click[b00lamp001]")
    done = env.step("click[buy now]")
    assert done.info["reward_info"].title_score == 0.0 and done.score == 0.0 and done.done


@pytest.mark.parametrize("asin", ["B00TEE0003", "B00LAMP001", "B00SOAP001"])
def test_expert_buys_the_goal_with_reward_1(env, asin):
    env.reset(_goal_task(env, asin))
    env.step("search[soap]")  # start off the expert's path: it must recover from any state
    step = None
    while (action := env.expert_action()) is not None:
        step = env.step(action)
        assert not step.info.get("invalid_action"), action
    assert step is not None and step.success and step.score == pytest.approx(100.0)


def test_turn_limit(data_dir):
    e = make("webshop", data_dir=data_dir, max_turns=2)
    e.reset("fixed_0")
    assert not e.step("search[lamp]").done
    last = e.step("click[back to search]")
    assert last.done and last.info["truncated"] and last.score == 0 and not last.success


def test_missing_data_and_bad_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="setup.sh"):
        make("webshop", data_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="items_shuffle"):
        make("webshop", data_dir=tmp_path)
    with pytest.raises(ValueError, match="goals"):
        make("webshop", data_dir=tmp_path, goals="expert")


def test_synthetic_goals(data_dir):
    e = make("webshop", data_dir=data_dir, goals="synthetic")
    texts = sorted(g.instruction_text.split(", and price")[0] for g in e.catalogue.goals)
    assert texts == ["i want a desk lamp with color: black", "i want a desk lamp with color: silver"]
    assert {tuple(g.goal_options.items()) for g in e.catalogue.goals} == {(("color", "black"),), (("color", "silver"),)}


# thefuzz's definitions written out (thefuzz itself is not a dependency): the oracle for reward.token_set_ratio.
def _thefuzz_process(text: str) -> str:
    """thefuzz.utils.full_process(force_ascii=True): delete code points 128-255, non-alphanumerics to spaces,
    lower-case, trim."""
    text = "".join(c for c in text if not 128 <= ord(c) < 256)
    return "".join(c if c.isalnum() else " " for c in text).lower().strip()


def _indel_ratio(a: str, b: str) -> float:
    """thefuzz.fuzz.ratio before rounding: 100 * 2 * LCS(a, b) / (len(a) + len(b)), 100 for two empty strings."""
    if not a and not b:
        return 100.0
    previous = [0] * (len(b) + 1)
    for ca in a:
        current = [0]
        for j, cb in enumerate(b):
            current.append(previous[j] + 1 if ca == cb else max(previous[j + 1], current[j]))
        previous = current
    return 200.0 * previous[-1] / (len(a) + len(b))


def _thefuzz_token_set_ratio(a: str, b: str) -> int:
    ta, tb = set(_thefuzz_process(a).split()), set(_thefuzz_process(b).split())
    if not ta or not tb:
        return 0
    shared = " ".join(sorted(ta & tb))
    with_a = f"{shared} {' '.join(sorted(ta - tb))}".strip()
    with_b = f"{shared} {' '.join(sorted(tb - ta))}".strip()
    candidates = [_indel_ratio(with_a, with_b)]
    if shared:
        candidates += [_indel_ratio(shared, with_a), _indel_ratio(shared, with_b)]
    return round(max(candidates))


def _fuzzy_corpus(n_pairs: int, seed: int = 0) -> list[tuple[str, str]]:
    """Attribute/option-like phrases, their case/punctuation/order/typo variants, accents and empty strings."""
    words = ["navy", "blue", "x-large", "small", "cotton", "t-shirt", "machine", "wash", "long", "lasting",
             "fluoride", "free", "size", "12", "pack", "of", "3", "gluten", "sugar", "high", "heels", "men's",
             "women", "café", "crème", "naïve", "über", "äb", "γάλα", "日本", "Größe", "the", "a", "&", "/", "1.5oz"]
    rng = random.Random(seed)

    def phrase() -> str:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 6)))
        if rng.random() < 0.3:
            text = text.upper() if rng.random() < 0.5 else text.title()
        if rng.random() < 0.3 and text:
            i = rng.randrange(len(text))
            text = text[:i] + rng.choice("aeiou-!, ") + text[i + 1:]
        return text

    pairs = []
    for _ in range(n_pairs):
        a = phrase()
        if rng.random() < 0.5:   # a variant of a: shuffled, repeated or extra tokens, new separators
            tokens = a.split()
            rng.shuffle(tokens)
            b = rng.choice([" ", "-", ", ", " | "]).join(tokens + [rng.choice(words)] * rng.randint(0, 2))
        else:
            b = phrase()
        pairs.append((a, b))
    return pairs + [("", ""), ("", "navy"), ("!!", "navy"), ("é", "e"), ("navy blue", "navy blue")]


def test_token_set_ratio_equals_thefuzz_definition_on_a_corpus():
    pairs = _fuzzy_corpus(1500)
    mismatches = [(a, b, token_set_ratio(a, b), _thefuzz_token_set_ratio(a, b)) for a, b in pairs
                  if token_set_ratio(a, b) != _thefuzz_token_set_ratio(a, b)]
    assert not mismatches, mismatches[:5]
    scores = {_thefuzz_token_set_ratio(a, b) for a, b in pairs}
    assert {0, 100} <= scores and len(scores) > 30   # the corpus exercises the whole range, not only the ends


def test_fuzzy_ratios_match_thefuzz():
    assert round(_indel_ratio("this is a test", "this is a test!")) == 97   # thefuzz.fuzz.ratio
    assert token_set_ratio("fuzzy was a bear", "fuzzy fuzzy was a bear") == 100
    assert token_set_ratio("new york mets vs atlanta braves", "atlanta braves vs new york mets") == 100
    assert token_set_ratio("navy blue", "Navy-Blue!") == 100
    assert token_set_ratio("x-large", "small") < 50


@pytest.mark.parametrize(("options", "error", "name"), [
    ({"max_turns": True}, TypeError, "max_turns"), ({"seed": "0"}, TypeError, "seed"),
    ({"seed": 1.5}, TypeError, "seed"), ({"num_products": True}, TypeError, "num_products"),
    ({"num_products": 0}, ValueError, "num_products"), ({"goals": "all"}, ValueError, "goals"),
    ({"data_dir": 3}, TypeError, "data_dir"), ({"colour": 1}, TypeError, "colour"),
])
def test_options_are_checked_not_coerced(data_dir, options, error, name):
    with pytest.raises(error, match=name):
        make("webshop", **{"data_dir": data_dir, **options})


@pytest.mark.parametrize("bad", ["fixed_²", "fixed_٣", "fixed_-1", "fixed_01", "fixed_", "fixed", "fixed_1_2",
                                 "Fixed_1", "fixed_1\x00"])
def test_odd_task_ids_name_the_expected_form(env, bad):
    with pytest.raises(ValueError, match="fixed_<goal index>"):
        env.reset(bad)


def test_any_str_action_gets_the_envs_own_observation(env, malformed_actions):
    env.reset(_goal_task(env, "B00LAMP001"))
    for action in malformed_actions:
        step = env.step(action)
        assert step.info.get("invalid_action") and not step.done and step.info["page"] == "search"
        step.observation.encode("utf-8")
        env.turns = 0   # stay under the turn limit: this checks the answers, not the limit
    assert env.step("search[desk lamp]").info["page"] == "results"
    with pytest.raises(TypeError, match="action must be a str"):
        env.step(b"search[lamp]")
