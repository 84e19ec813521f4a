"""HTTP layer: parse, call the engine, encode. Nothing here touches torch optimizers."""
