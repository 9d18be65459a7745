"""Training methods: each file says what one training step does; the engine does the rest."""
