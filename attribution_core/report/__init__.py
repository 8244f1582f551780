"""Reports: tables (pandas), figures (matplotlib, Agg), image grids, report.md and report.html."""
