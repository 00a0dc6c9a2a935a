"""Train state, pure steps, sharding and checkpointing."""
