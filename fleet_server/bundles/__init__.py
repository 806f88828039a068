"""The bundle store: streamed, verified uploads stored content-addressed on local disk, token-protected
downloads with HTTP Range, and garbage collection of unreferenced bundles."""
