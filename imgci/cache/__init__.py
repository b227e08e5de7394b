"""The build cache: step keys (``keys``), cache records (``records``), the local cache in the state store
(``local``), miss explanations (``explain``), import/export backends (``backends``: registry ref, local directory,
inline) and the per-build view that ties them together (``manager``)."""
