"""The analysis service (`service.py`), its HTTP API (`api.py`) and the criteria vector store
(`vectorstore.py`). The model and embedding clients it calls live in `floorplan_ft.providers`;
nothing in the pipeline's phases imports from here."""
