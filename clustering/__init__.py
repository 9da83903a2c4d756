"""Cohort clustering: FAISS neighbours, UMAP, HDBSCAN / k-means, NMF concepts, cluster summaries.

Works on arrays and DataFrames only (no torch, no wsi_explain): the application reads the
feature stores and writes the cohort tables.
"""

from .cluster import ClusterResult, hdbscan_cluster, kmeans_cluster
from .concepts import (
    ConceptModel,
    concept_cam_correlation,
    concept_maps,
    concept_prediction_association,
    fit_concepts,
    sample_positions,
)
from .neighbors import KnnGraph, NeighbourIndex, faiss_gpus, knn_graph, knn_query, save_index
from .reduce import l2_normalise, pca_reduce, umap_cohort, umap_embed
from .slices import artefact_masks, artefact_slices
from .summary import FLAG_NAMES, FlagRules, off_tissue_fraction, summarize_clusters

__all__ = [
    "ClusterResult",
    "ConceptModel",
    "artefact_masks",
    "artefact_slices",
    "FLAG_NAMES",
    "FlagRules",
    "KnnGraph",
    "NeighbourIndex",
    "concept_cam_correlation",
    "concept_maps",
    "concept_prediction_association",
    "faiss_gpus",
    "fit_concepts",
    "hdbscan_cluster",
    "kmeans_cluster",
    "knn_graph",
    "knn_query",
    "l2_normalise",
    "save_index",
    "off_tissue_fraction",
    "pca_reduce",
    "sample_positions",
    "summarize_clusters",
    "umap_cohort",
    "umap_embed",
]
