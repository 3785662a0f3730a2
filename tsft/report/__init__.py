"""result.json writing and aggregation into tables."""
