"""Scale-out: the same batch work fanned out over several engines (rksc.cluster.ray: a Ray cluster)."""

from rksc.cluster.ray import Workers, require

__all__ = ["Workers", "require"]
