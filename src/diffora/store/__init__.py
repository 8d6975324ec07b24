"""Files on disk: atomic writes and safe loads (``io``), resumable checkpoints (``checkpoint``) and the search
record ``dam.json`` (``record``)."""
