"""Entry-point layer: config -> topology -> framework engine -> training loop."""
