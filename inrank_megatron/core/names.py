"""The vocabulary of InRank's settings (no torch here, so configs can be checked without it)."""

MODES = ("efficient", "cumulative")  # spec section 2
RATIO_RULES = ("variance", "energy")  # explained-ratio rules, spec section 3 (energy: opt-in)
STAGES = ("growing", "fixed")  # spec section 4
POLICIES = ("slice", "reset", "project")  # optimizer state across a reallocation
