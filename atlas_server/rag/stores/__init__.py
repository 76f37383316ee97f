"""The built-in vector store back ends, one module each (registered in plugins/stores.py).

Each module implements `atlas_server.rag.store.VectorStore` and imports its client library
only when opened, so an Atlas without pymilvus or faiss installed still starts.
"""
