"""TRAK and D-TRAK: seeded random projections and the projected empirical Fisher."""
