"""Plugin registry (placeholder until the registry lands)."""
