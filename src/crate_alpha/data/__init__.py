"""Data: DataComp metadata to webdataset shards (img2dataset), shard checks, the demo corpus,
and a reduced-size JPEG decode for low-resolution training."""
