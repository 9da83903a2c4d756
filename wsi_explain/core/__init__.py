"""Infrastructure every other part uses: the run folder and its manifest, atomic writes, frozen
stage configs, errors, the slide executor and process tuning. Imports nothing else of
wsi_explain.
"""
