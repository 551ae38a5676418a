"""The vocabulary of InRank's settings (no torch here, so configs can be checked without it)."""

MODES = ("efficient", "cumulative")  # spec section 2
INITS = ("kaiming", "spectral")  # factor init: the reference's, or Khodak et al.'s (efficient mode)
RATIO_RULES = ("variance", "energy")  # explained-ratio rules, spec section 3 (energy: opt-in)
STAGES = ("growing", "fixed")  # spec section 4
POLICIES = ("slice", "reset", "project")  # optimizer state across a reallocation
SIGNALS = ("product", "update")  # what spectrum the rank rule reads (product: the spec)
# What stage 1 trains: the spec's r0 + b growing slots, all min(in, out) slots of the factors, or
# the dense weight (one factor holds W, the other is the identity).
STARTS = ("low_rank", "full_rank", "dense")
