"""The service's stores: where sessions, transcripts and shared state are kept."""
