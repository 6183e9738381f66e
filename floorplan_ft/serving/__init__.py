"""The analysis service (`service.py`, with its errors in `errors.py` and request admission in
`admission.py`), its HTTP API (`api.py`) and the criteria vector store (`vectorstore.py`, its schema
changes in `vector_migrations.py`). The model and embedding clients it calls live in
`floorplan_ft.providers`, the pgvector access it shares with phase 2 in `floorplan_ft.retrieval`;
nothing in the pipeline's phases imports from here."""
