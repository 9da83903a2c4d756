"""Cohort clustering: FAISS neighbours, UMAP, HDBSCAN, NMF concepts, cluster summaries.

Not yet implemented (see the clustering issue); the package exists so the layout is fixed.
"""

__all__: list[str] = []
