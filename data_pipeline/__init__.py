"""Streaming data pipeline: video decoding, pre-tokenization to shards, packed resumable loading.

Installed as `lvm.data_pipeline`.
"""
