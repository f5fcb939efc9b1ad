"""The size of what a traced function materialises, read off its jaxpr."""
import jax
import numpy as np


def largest_intermediate(jaxpr) -> int:
    """The most elements of any value in a jaxpr, its sub-jaxprs (loops, conds) included."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(var.aval.shape, dtype=np.int64)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    largest = max(largest, largest_intermediate(sub))
    return largest
