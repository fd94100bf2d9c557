"""What a traced program stages: primitives of a jaxpr, its sub-jaxprs (loop bodies, branches,
nested programs) included."""


def staged(jaxpr, names) -> list[str]:
    """The primitives named in `names` that `jaxpr` stages, in order, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            found.append(eqn.primitive.name)
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, 'jaxpr', sub)
                if hasattr(inner, 'eqns'):
                    found += staged(inner, names)
    return found
