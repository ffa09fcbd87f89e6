"""The catalog: public models, plans, prices, limits and upstream deployments, as data.

Loaded once at start from the shipped ``defaults.toml`` and the operator's ``dubhe.toml``. An
operator's ``[models.X]`` or ``[plans.X]`` overrides the fields it names (``enabled = false``
drops the entry, a new id adds one); ``[[upstreams]]`` and ``[defaults]`` keys replace the shipped
ones.
"""

from dubhe.catalog._loader import OUTPUT_LIMIT_FIELDS, CatalogError, load_catalog
from dubhe.catalog._types import Catalog, ModelSpec, PlanSpec, UpstreamSpec

__all__ = [
    "OUTPUT_LIMIT_FIELDS",
    "Catalog",
    "CatalogError",
    "ModelSpec",
    "PlanSpec",
    "UpstreamSpec",
    "load_catalog",
]
