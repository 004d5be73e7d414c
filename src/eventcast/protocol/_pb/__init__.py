"""Generated Protobuf code of the client protocol (``make proto`` regenerates it)."""
