"""Your own data: image-caption folders, WebDataset shards, interleaved documents and text corpora, prepared
once (``python -m lit_transfusion prepare``) into litdata chunks and streamed into packed Transfusion batches."""
