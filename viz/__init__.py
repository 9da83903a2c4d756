"""Bokeh views and HTML reports.

Not yet implemented (see the explorer/report issue); the package exists so the layout is fixed.
"""

__all__: list[str] = []
