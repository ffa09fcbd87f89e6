"""The catalog: public models, plans, prices, limits and upstream deployments, as data.

Loaded once at start from the shipped ``defaults.toml`` and the operator's ``dubhe.toml``; a
top-level table in the operator's file replaces the shipped table of the same name.
"""

from dubhe.catalog._loader import CatalogError, load_catalog
from dubhe.catalog._types import Catalog, ModelSpec, PlanSpec, UpstreamSpec

__all__ = ["Catalog", "CatalogError", "ModelSpec", "PlanSpec", "UpstreamSpec", "load_catalog"]
