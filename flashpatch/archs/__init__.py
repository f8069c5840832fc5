"""One module per architecture: what it matches and the quirks the patched path must reproduce."""
