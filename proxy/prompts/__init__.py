"""Task age without a header: when the current prompt started, from the request."""
