"""Adapters to Redis and Kafka: the feature store, the ledger and the model store in Redis
(with their Lua scripts), Kafka plumbing, and the decoding of raw Kafka records.
"""
