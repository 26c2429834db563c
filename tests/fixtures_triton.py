"""(placeholder until the owning area lands its fixtures)."""
