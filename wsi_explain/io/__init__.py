"""Data on disk and its readers: slide discovery, the tile table, the per-slide features store, the
tile loader and tile images. Imports only wsi_explain.core.
"""
