"""What a rewrite did: the report (matches, near misses, counts), its graphs and its HTML pictures."""
from fuser.report.report import GraphBreak, MatchRecord, NearMiss, Report, Where

__all__ = ["GraphBreak", "MatchRecord", "NearMiss", "Report", "Where"]
