"""Data for federated simulation: sources by name, client partitions, device batching.

Host side (numpy): `sources.load_dataset` -> `partition.partition` -> `partition.pad_client_indices`.
Device side (jax, inside the jitted round): `batching.client_permutation` ->
`batching.batch_positions` -> `batching.gather_batch`.
"""
