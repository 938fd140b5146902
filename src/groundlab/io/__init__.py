"""Leaf package: where files come from (local paths, or object storage URIs fetched into the cache)."""
