"""The results: columns, rows, comparisons and the frontier, the HTML report, tracking servers, the terminal table
and progress.
"""
