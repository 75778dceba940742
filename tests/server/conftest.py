import pandas as pd
import pytest

from mmn_fed import load_builtin


@pytest.fixture(scope="session")
def heart_sites() -> tuple[dict[str, pd.DataFrame], object]:
    """The 4 real hospitals of `heart` as sites (name -> rows) and the schema with the disease task only."""
    df, schema = load_builtin("heart")
    schema = schema.subset(tasks=["disease"])
    return {n: g.reset_index(drop=True) for n, g in df.groupby("dataset")}, schema


@pytest.fixture(scope="session")
def two_sites(heart_sites):
    """Two sites; the second has no imaging at all (its imaging columns are empty)."""
    sites, schema = heart_sites
    a = sites["Cleveland"].iloc[:120].reset_index(drop=True)
    b = sites["Hungary"].iloc[:120].reset_index(drop=True).copy()
    for c in schema.modalities["imaging"]:
        b[c] = None
    return {"Cleveland": a, "Hungary": b}, schema
