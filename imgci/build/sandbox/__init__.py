"""The RUN sandbox: namespaces (``libc``, ``child``), id maps (``idmap``), probing (``probe``), snapshots
(``snapshots``) and the build process's side (``launcher``). Only ``libc`` uses cffi."""
