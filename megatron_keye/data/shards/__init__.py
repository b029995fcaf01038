"""WebDataset shards: the preprocessing writer, the sharded loader, packing."""
