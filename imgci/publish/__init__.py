"""Publishing results: pushing tags with retries (``push``), the run report model (``report``), and reporting it
to people and CI systems (``summary``: log table and markdown; ``github``; ``gitlab``)."""
