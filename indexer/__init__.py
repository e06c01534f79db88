"""The offline index: `indexer build|add|remove|compact|info|search` and the `Searcher` engine.

An index directory holds:
  manifest.json      format version, checkpoint path + sha256, dims, grid, counts, FAISS factory
                     strings with nprobe/efSearch, token form, segments, per-file sha256
  images.faiss       IndexIDMap2 over image global vectors (text -> image stage one)
  captions.faiss     IndexIDMap2 over caption global vectors (image -> text stage one)
  tokens-NNN.h5      token store segments: per kind a contiguous uint8 `rows` dataset (encoded
                     token rows, memory-mapped for the re-rank gather), `offsets`, `lengths`,
                     `ids` and float32 `global` vectors
  image.codec / caption.codec   trained PQ codecs (FAISS serialisation) for pq/opq forms
  meta.sqlite        items (id, kind, path, caption, image_id, metadata JSON, sha256, segment,
                     position, tombstone), the build report, filterable field names
  build_report.json  skipped / duplicate / missing inputs with reasons
"""
