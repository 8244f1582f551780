"""Diffusion-specific attribution methods: ``journey-trak`` and ``das``.

Registered through the entry point ``diffusion_methods`` (see :mod:`.plugin`); the equations
are in ``docs/methods/journey-trak.md`` and ``docs/methods/das.md``.
"""
