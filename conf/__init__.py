"""decodekit's Hydra configs: groups model/, tokenizer/ and strategy/ (shipped as decodekit.conf)."""
