"""The audit's self-test: known shortcuts planted into a run's own tiles, and the audit's recall
and precision on them (``wsi-explain selftest``)."""
