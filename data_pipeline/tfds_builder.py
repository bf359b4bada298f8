"""A TFDS dataset builder over a pre-tokenized corpus, so it also loads with `tfds.data_source` (ArrayRecord).

This is the only module of the project that imports TensorFlow (through tensorflow_datasets); the training
loader (`lvm.data_pipeline.loader`) does not, so training and inference start without it.

    from lvm.data_pipeline.tfds_builder import prepare
    prepare("runs/corpus", data_dir="runs/tfds")          # shards -> ArrayRecord files under data_dir
    import tensorflow_datasets as tfds
    source = tfds.data_source("lvm_tokens", data_dir="runs/tfds", split="train")
    source[0]  # {"id": ..., "tokens": int32 [n], "vision_mask": bool [n], "loss_mask": float32 [n]}

The corpus is read through `lvm.data_pipeline.storage` (so `gs://` corpora work through gcsfs); the ArrayRecord
output goes to a local `data_dir` (ArrayRecord and tf.io.gfile do not honour a GCS emulator).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from lvm.data_pipeline import storage
from lvm.data_pipeline.shards import Corpus, ShardData


class LvmTokens(tfds.core.GeneratorBasedBuilder):
    """Token records of a corpus written by `lvm pretokenize` (corpus folder or gs:// URI as `manual_dir`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Token ids, vision mask and loss mask per record."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the `lvm pretokenize` output folder (or gs:// URI) as manual_dir."

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Interleaved text/vision token records (see lvm.tokenizers.format).",
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "vision_mask": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                    "loss_mask": tfds.features.Tensor(shape=(None,), dtype=np.float32),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(str(dl_manager.manual_dir))}

    def _generate_examples(self, corpus_uri: str):
        corpus = Corpus.open(corpus_uri)
        cache = storage.FileCache(str(self.data_path) + ".cache", max_bytes=1 << 30)
        for shard in corpus.shards:
            data = ShardData.load(cache.fetch(shard.uri))
            for i, rid in enumerate(shard.ids):
                rec = data.record(i)
                yield (
                    f"{shard.uri}#{i}",
                    {
                        "id": rid,
                        "tokens": rec.tokens,
                        "vision_mask": rec.vision_mask,
                        "loss_mask": rec.loss_mask,
                    },
                )
            cache.discard(shard.uri)


def prepare(corpus_uri: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """Write the corpus as the `lvm_tokens` TFDS dataset (ArrayRecord files) under `data_dir`."""
    builder = LvmTokens(data_dir=data_dir, file_format="array_record")
    # The manual dir is a URI the builder reads through gcsfs, not a path TFDS should open: keep it a string.
    config = tfds.download.DownloadConfig(manual_dir=corpus_uri)
    builder.download_and_prepare(download_config=config)
    return builder
