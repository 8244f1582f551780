"""K-FAC / EK-FAC influence (curvlinops): Hessians ``kfac``, ``ekfac``, ``ggn-cg`` and presets.

See ``docs/methods/kfac.md`` for the units (H = the GGN of L_D, damping absolute) and the
relation between the Fisher variants.
"""
