"""Phase 2: the criteria corpus and top-k retrieval (the embedding clients are in `floorplan_ft.providers`)."""
