"""Data modules, one per task family."""
