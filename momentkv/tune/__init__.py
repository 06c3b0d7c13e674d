"""``momentkv tune``: a search over the policy space for one model, prompt set and budget (Optuna)."""
