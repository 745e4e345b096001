//! Safetensors checkpoints of a shard.
