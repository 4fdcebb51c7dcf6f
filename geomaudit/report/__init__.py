"""The report document, its JSON Schema and its rendering."""
