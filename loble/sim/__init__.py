"""The deterministic discrete-event simulator, driving loble.core."""
