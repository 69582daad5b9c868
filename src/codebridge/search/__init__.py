"""Search a collection with a trained model: build an index (``index``), query it (``searcher``), serve it (``api``)."""
