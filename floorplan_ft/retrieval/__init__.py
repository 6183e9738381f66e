"""Phase 2: embedding backends, the criteria corpus and top-k retrieval."""
