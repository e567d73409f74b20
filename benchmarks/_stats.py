"""Percentiles, rows and the table: deadstop.supervisor.bench.stats, under the name the scripts here import."""

from deadstop.supervisor.bench.stats import MS, Dist, Row, format_table, latency_row, percentile, rate_row  # noqa: F401
