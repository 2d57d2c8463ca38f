"""Policies: the model (frozen dataclasses), loading and validating files, and live reload.

`load` reads YAML into a `Policy` through `build` (shape and types) and `check` (cross-field
rules); every problem is collected into one `PolicyError`. `reload` keeps the enforced policy and
swaps it only for one that loads cleanly.
"""

from __future__ import annotations

from proxy.policy.load import load_policy
from proxy.policy.model import Budget, KeyPolicy, Policy
from proxy.policy.reload import PolicyHolder

__all__ = ["Budget", "KeyPolicy", "Policy", "PolicyHolder", "load_policy"]
