"""The one numerics contract every door holds a rewrite to (verify, fuzz, convert, experts)."""
