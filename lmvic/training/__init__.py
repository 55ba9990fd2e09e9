"""CPU-first training engine: uint8 crop cache, short-run schedules, variable-rate loop, DDP."""
