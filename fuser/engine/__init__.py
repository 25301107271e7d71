"""The compiler's engine: canonical spellings, matching, capture, planning and applying rewrites."""
