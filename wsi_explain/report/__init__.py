"""What a person reads: report pages from autoescaped templates, the served explorer, exports,
cluster names and verdicts.
"""
