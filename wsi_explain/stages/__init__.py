"""The pipeline's stages (tile, extract, cluster, score, report), the per-slide driver they share,
and the pipeline that runs them in order.
"""
