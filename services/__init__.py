"""autointerv: streaming comparison of a base and an intervention language model."""
