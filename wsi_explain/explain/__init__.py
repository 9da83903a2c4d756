"""The explainers: model loading (card, checkpoints, adapters, layers), CAMs and the fused pass,
captum attributors, map normalisation. Imports only wsi_explain.core.
"""
