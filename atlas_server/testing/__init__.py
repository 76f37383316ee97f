"""Test helpers for plugin authors: `store_contract`, the suite a vector store back end
runs in its own tests (docs/plugins.md). Nothing here is imported by Atlas itself."""
