"""Page-selection policies for retrieval heads, by name (`--sparse-policy`). A new policy is one file
plus one line here."""

from needle.attention.policies.base import SelectionRequest, SparsePolicy
from needle.attention.policies.hierarchical import HierarchicalPolicy
from needle.attention.policies.hip import HipPolicy
from needle.attention.policies.quest import QuestPolicy
from needle.attention.policies.recent import RecentPolicy

POLICIES: dict[str, type[SparsePolicy]] = {
    p.name: p for p in (HierarchicalPolicy, QuestPolicy, HipPolicy, RecentPolicy)
}

__all__ = ["POLICIES", "SelectionRequest", "SparsePolicy"]
