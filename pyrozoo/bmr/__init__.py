"""Bayesian model reduction: closed forms, pruning rules, masks and the rebuilt sparse net."""
