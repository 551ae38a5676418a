"""The InRank growth schedule over a model's layers (:mod:`.controller`): rank checks, the stage cut,
the resizes a backend applies."""
